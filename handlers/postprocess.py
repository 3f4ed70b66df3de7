"""Steps applied to a subtask's validated output before it is recorded (declared by the subtask)."""

from __future__ import annotations

from typing import Any

from commands.ticket import Ticket
from inference.prompts import PromptInput
from streams import contract


class OutputPostprocessor:
    async def apply(
        self,
        ticket: Ticket,
        definition: contract.SubtaskDefinition,
        prompt: PromptInput,
        output: dict[str, Any],
    ) -> dict[str, Any]:
        return output
