"""Shared by the models' configs."""
from dataclasses import fields


class FromHF:
    """For a dataclass config whose field names are Hugging Face's.

    A subclass names the `model_type`s it describes (HF_MODEL_TYPES) and the Hugging Face options
    it implements only at one value (HF_FIXED: option -> that value): `from_hf` refuses a config
    that sets one otherwise, instead of building a model that computes something else."""
    HF_MODEL_TYPES = ()
    HF_FIXED = {}

    @classmethod
    def from_hf(cls, config):
        """From a transformers config (or anything with these attributes); fields it lacks keep
        their defaults. Raises ValueError for a config of another model type or an option this
        implementation does not have."""
        model_type = getattr(config, "model_type", None)
        if cls.HF_MODEL_TYPES and model_type is not None and model_type not in cls.HF_MODEL_TYPES:
            raise ValueError(f"config is a {model_type!r} config; {cls.__name__}.from_hf takes "
                             f"model_type {' or '.join(map(repr, cls.HF_MODEL_TYPES))}")
        for option, only in cls.HF_FIXED.items():
            value = getattr(config, option, only)
            if value != only:
                raise ValueError(f"config.{option}={value!r} is not supported by "
                                 f"{cls.__name__} (it implements only {option}={only!r})")
        return cls(**{f.name: getattr(config, f.name) for f in fields(cls) if hasattr(config, f.name)})
