"""fusedlm's own models: Hugging Face parameter names, fused kernels, no work on padding."""
from .bert import (BertConfig, BertForMaskedLM, BertForPreTraining, BertForSequenceClassification,
                   BertModel, BertOutput, RobertaConfig, RobertaForMaskedLM,
                   RobertaForSequenceClassification)
from .gpt import CausalLMOutput, GPTConfig, GPTForCausalLM, GPTModel

__all__ = ["BertConfig", "BertModel", "BertForPreTraining", "BertForMaskedLM",
           "BertForSequenceClassification", "BertOutput", "RobertaConfig", "RobertaForMaskedLM",
           "RobertaForSequenceClassification",
           "GPTConfig", "GPTModel",
           "GPTForCausalLM", "CausalLMOutput"]
