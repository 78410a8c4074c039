from shared.errors import InvalidRequest


class UnknownBaseModel(InvalidRequest):
    code = "model_not_available"

    def __init__(self, model: str, available: list[str]):
        listed = ", ".join(available) if available else "none (import one with `tunequeue models import-demo`)"
        super().__init__(f"Model {model!r} is not available for fine-tuning. Available models: {listed}", param="model")
