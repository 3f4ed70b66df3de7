"""The pipeline catalog the command side uses: shipped definitions, validated by the contract."""

from __future__ import annotations

from inference.pipelines import pipeline_definition, pipeline_names
from streams.contract import PipelineDefinition


class ShippedPipelines:
    def get(self, name: str) -> PipelineDefinition:
        return PipelineDefinition.model_validate(pipeline_definition(name))

    def names(self) -> list[str]:
        return pipeline_names()
