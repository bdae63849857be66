"""The built-in demo behind `fusedlm pretrain`: generated corpus, WordPiece tokenizer, BERT
pretraining (masked LM + next sentence) and fine-tuning, fused and reference side by side."""
from .train import Settings, run

__all__ = ["Settings", "run"]
