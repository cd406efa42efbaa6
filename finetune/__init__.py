"""finetune: fine-tune pre-trained Hugging Face encoders for sequence classification."""

__version__ = "0.1.0"
