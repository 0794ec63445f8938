"""choline for scripts built on other frameworks: logging, checkpoint hand-off and live control without
switching to ``choline.Trainer``.

- ``choline.integrations.lightning``: ``CholineLogger`` and ``CholineCheckpoint`` for PyTorch Lightning
  (``pip install 'choline[lightning]'``);
- ``choline.integrations.huggingface``: ``CholineCallback`` for the Hugging Face ``Trainer``
  (``pip install 'choline[transformers]'``).

Both carry the framework's own checkpoint inside a choline checkpoint, byte for byte (see ``_files``), so the
agent uploads it, a new machine gets it back, and the framework resumes from it the way it always does.
"""
