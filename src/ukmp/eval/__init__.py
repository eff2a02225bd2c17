"""Evaluation: pure metrics (``ukmp.eval.metrics``), VQA answer normalisation (``ukmp.eval.normalize``) and the
reference's text processing, prompts and decoding settings (``ukmp.eval.text``).

Kept light: nothing is imported here; pycocoevalcap is imported only when captions are scored.
"""

__all__ = ["metrics", "normalize", "text"]
