from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from shared.exports.models import Export

Status = Literal["queued", "running", "succeeded", "failed"]


class ExportCreate(BaseModel):
    """`{"format": "merged", "dtype": "bfloat16"}`, `{"format": "gguf", "quantization": "q8_0"}` or
    `{"format": "adapter"}`."""

    model_config = ConfigDict(extra="forbid")

    format: Literal["merged", "gguf", "adapter"] = Field(
        description="`merged`: the LoRA update merged into the base, as safetensors shards with the tokenizer and "
        "chat template, loadable by AutoModelForCausalLM.from_pretrained; `gguf`: the merged model as one GGUF file "
        "for llama.cpp and Ollama, with a Modelfile; `adapter`: the adapter's zip"
    )
    dtype: Literal["bfloat16", "float16", "float32"] = Field(
        "bfloat16", description="the merged weights' dtype (the merge itself is computed in float32)"
    )
    quantization: Literal["f16", "q8_0"] = Field("q8_0", description="a GGUF's tensor type (norms stay float32)")
    base_weights: Literal["nf4", "original"] = Field(
        "nf4",
        description="the base weights the update is merged into: `nf4`, the 4-bit weights the adapter was trained "
        "against, dequantised; `original`, the base's own 16-bit weights (docs/export.md compares them)",
    )

    max_loss_drift: float | None = Field(
        None,
        ge=0,
        le=1,
        description="the largest relative difference of the export's held-out loss from the model as trained that "
        "still delivers it (default: the server's TUNEQUEUE_EXPORT_MAX_LOSS_DRIFT, 0.01)",
    )

    def options(self) -> dict:
        bound = {} if self.max_loss_drift is None else {"max_loss_drift": self.max_loss_drift}
        if self.format == "merged":
            return {"dtype": self.dtype, "base_weights": self.base_weights, **bound}
        if self.format == "gguf":
            return {"quantization": self.quantization, "base_weights": self.base_weights, **bound}
        return {}


class ExportObject(BaseModel):
    """tunequeue's own: a job's model exported (`POST /v1/fine_tuning/jobs/{id}/exports`)."""

    object: Literal["fine_tuning.job.export"] = "fine_tuning.job.export"
    id: str
    fine_tuning_job_id: str
    format: str
    dtype: str | None = None
    quantization: str | None = None
    base_weights: str | None = None
    max_loss_drift: float | None = None
    status: Status
    error: str | None = Field(None, description="why it failed, with the figures when its fidelity was out of bounds")
    progress: str | None = Field(None, description="the step a running export is at")
    bytes: int | None = None
    sha256: str | None = Field(None, description="of the zip `GET …/content` returns")
    fidelity: dict | None = Field(None, description="the merged model against the model as trained (docs/export.md)")
    manifest: dict | None = Field(None, description="what was made, from what, with which libraries")
    created_at: int
    finished_at: int | None = None

    @classmethod
    def of(cls, export: Export, status: str, error: str | None) -> "ExportObject":
        manifest = export.manifest or None
        return cls.model_validate(
            {
                "id": export.id,
                "fine_tuning_job_id": export.job_id,
                "format": export.format,
                **export.options,
                "status": status,
                "error": error,
                "progress": export.progress if status == "running" else None,
                "bytes": export.bytes,
                "sha256": export.sha256,
                "fidelity": manifest.get("fidelity") if manifest else None,
                "manifest": {k: v for k, v in manifest.items() if k != "fidelity"} if manifest else None,
                "created_at": export.created_at,
                "finished_at": export.finished_at,
            }
        )
