"""Evaluation: perplexity (`sparsefast.eval.perplexity`) and zero-shot tasks (`sparsefast.eval.zeroshot`)."""

from sparsefast.eval.perplexity import evaluate_perplexity, perplexity

__all__ = ["evaluate_perplexity", "perplexity"]
