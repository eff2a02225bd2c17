"""Dataset loaders configured from ``configs/datasets/*.yaml`` (see ``ukmp.data.loaders``) and sample data.

Kept light: import ``ukmp.data.loaders``, ``ukmp.data.records`` or ``ukmp.data.sample`` for the contents.
"""

__all__ = ["config", "loaders", "records", "sample", "textclean"]
