"""isaret: transformer classifiers of isolated signs from landmark sequences."""

__version__ = "0.2.0"


def load_predictor(path, device: str = "cpu"):
    """Load a checkpoint file as an `isaret.predict.Predictor`, ready for `predict(array_or_path, top_k=...)`."""
    from isaret.predict import Predictor

    return Predictor.from_checkpoint(path, device=device)


__all__ = ["__version__", "load_predictor"]
