"""The query API's JSON responses: pydantic's serialiser writes the body, and it reads back as
the model's own JSON form."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime

from read_api.routes.common import json_response
from read_api.schemas import ProjectionState, Question, TicketQuestions


def test_a_model_answers_as_its_json_with_the_projection_headers() -> None:
    state = ProjectionState(position=42, behind=True)
    body = TicketQuestions(
        ticket_id=uuid.UUID(int=7),
        items=[
            Question(
                question_id=uuid.UUID(int=8),
                subtask_id="question_8",
                ordinal=0,
                question="Qu'en dit l'étude ? ½ ✓",
                asked_by="alice",
                status="answered",
                attempts=1,
                answer={"answer": "oui", "score": 0.25, "citations": [{"page": 1}]},
                asked_at=datetime(2030, 1, 2, 3, 4, 5, 600000, tzinfo=UTC),
                updated_at=datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC),
            )
        ],
        projection=state,
    )

    response = json_response(body, state)

    assert response.media_type == "application/json"
    assert response.headers["content-type"] == "application/json"
    assert response.headers["x-projection-position"] == "42"
    assert response.headers["x-projection-behind"] == "true"
    assert response.headers["content-length"] == str(len(response.body))
    assert json.loads(bytes(response.body)) == body.model_dump(mode="json")
    assert "Qu'en dit l'étude ? ½ ✓".encode() in response.body  # UTF-8, not \\u escapes
    assert b'"asked_at":"2030-01-02T03:04:05.600000Z"' in response.body
