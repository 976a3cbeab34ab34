"""The LLaVA emotion engine: checkpoint loading, one-pass scoring, and a tiny test checkpoint."""

from consumer.engine.loader import ModelLoadError
from consumer.engine.scoring import EmotionEngine, FaceScores
from consumer.engine.tiny import make_tiny_checkpoint

__all__ = ["EmotionEngine", "FaceScores", "ModelLoadError", "make_tiny_checkpoint"]
