"""Evaluation: perplexity, zero-shot tasks, roofline planning and results reports."""
from .perplexity import perplexity
from .zeroshot import evaluate, evaluate_task

__all__ = ["evaluate", "evaluate_task", "perplexity"]
