"""Shared by the models' configs."""
from dataclasses import fields


class FromHF:
    """For a dataclass config whose field names are Hugging Face's."""

    @classmethod
    def from_hf(cls, config):
        """From a transformers config (or anything with these attributes); fields it lacks keep
        their defaults."""
        return cls(**{f.name: getattr(config, f.name) for f in fields(cls) if hasattr(config, f.name)})
