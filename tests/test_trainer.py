"""Hugging Face's Trainer drives a patched Hugging Face model and fusedlm's own model: a few
optimizer steps on CPU lower the masked-LM loss."""
import copy

import pytest
import torch

import fusedlm
import fusedlm.models as fm

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # the Trainer's own dependency

CONFIG = dict(vocab_size=101, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
              intermediate_size=64, max_position_embeddings=40)


class _MaskedLM(torch.utils.data.Dataset):
    """Repeating 4-token patterns, padded to different lengths, 30% of tokens to predict."""

    def __init__(self, n=64, seq=16):
        g = torch.Generator().manual_seed(0)
        self.rows = []
        for i in range(n):
            ids = torch.arange(seq) % 4 + 5 + 4 * (i % 3)
            length = seq - i % 5
            mask = (torch.arange(seq) < length).long()
            pick = (torch.rand(seq, generator=g) < 0.3) & (mask == 1)
            pick[1] = True
            labels = torch.where(pick, ids, torch.full_like(ids, -100))
            self.rows.append(dict(input_ids=torch.where(pick, torch.full_like(ids, 4), ids) * mask,
                                  attention_mask=mask, labels=labels))

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def _train(model, tmp_path):
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=20, per_device_train_batch_size=8, learning_rate=3e-3,
        logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_MaskedLM())
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 20 and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) / 3 < 0.8 * losses[0], losses


def test_trainer_with_a_patched_model(tmp_path):
    torch.manual_seed(0)
    model = transformers.BertForMaskedLM(transformers.BertConfig(**CONFIG))
    report = fusedlm.patch(model)
    assert report.patched
    _train(model, tmp_path)


def test_trainer_with_fusedlms_model(tmp_path):
    torch.manual_seed(0)
    _train(fm.BertForMaskedLM(fm.BertConfig(**CONFIG)), tmp_path)


class _CausalLM(_MaskedLM):
    """The same rows with every real token as a label (GPT-2 shifts them itself)."""

    def __getitem__(self, i):
        row = self.rows[i]
        ids = torch.where(row["labels"] >= 0, row["labels"], row["input_ids"])
        return dict(input_ids=ids, attention_mask=row["attention_mask"],
                    labels=ids.masked_fill(row["attention_mask"] == 0, -100))


def test_gradient_accumulation_matches_the_unpatched_model(tmp_path):
    """With gradient accumulation Trainer passes num_items_in_batch and, because the forward
    takes **kwargs, does not divide the loss by the accumulation steps itself: a patched loss
    that ignored num_items_in_batch trained with k times the gradient."""
    gpt2 = transformers.GPT2Config(vocab_size=101, n_positions=40, n_embd=32, n_layer=2, n_head=4,
                                   resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    ref = transformers.GPT2LMHeadModel(gpt2)
    model, start = copy.deepcopy(ref), copy.deepcopy(ref)
    fusedlm.patch(model)
    runs = []
    for m in (ref, model):
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4,
            gradient_accumulation_steps=3, learning_rate=0.5, lr_scheduler_type="constant",
            optim="sgd", max_grad_norm=0.0,  # updates in proportion to the gradient
            logging_steps=1, save_strategy="no", report_to="none", use_cpu=True,
            disable_tqdm=True)
        trainer = transformers.Trainer(model=m, args=args, train_dataset=_CausalLM())
        trainer.train()
        runs.append([h["loss"] for h in trainer.state.log_history if "loss" in h])
    assert len(runs[0]) == 3 and runs[0] == pytest.approx(runs[1], rel=1e-4), runs
    for (n, p), q, p0 in zip(ref.named_parameters(), model.parameters(), start.parameters()):
        assert (p - q).norm() <= 1e-3 * (p - p0).norm() + 1e-7, n


def test_trainer_with_packed_steps(tmp_path):
    """fusedlm.packing under Trainer: a dataset of whole steps, batch size 1, the collator
    unwrapping each; every step the same shapes."""
    from fusedlm.packing import PackedBatchSampler, PackedSteps, PackingCollator
    rows = _MaskedLM()
    samples = [dict(input_ids=r["input_ids"][r["attention_mask"] == 1],
                    labels=r["labels"][r["attention_mask"] == 1]) for r in rows]
    sampler = PackedBatchSampler([len(s["input_ids"]) for s in samples], tokens=96,
                                 max_sequences=12, max_seqlen=16)
    collate = PackingCollator(tokens=96, max_sequences=12, max_seqlen=16)
    shapes = set()

    def collator(batch):
        out = collate(batch)
        shapes.add((out["input_ids"].shape, out["cu_seqlens"].shape))
        return out

    torch.manual_seed(0)
    model = fm.BertForMaskedLM(fm.BertConfig(**CONFIG))
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=20, per_device_train_batch_size=1, learning_rate=3e-3,
        logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, data_collator=collator,
                                   train_dataset=PackedSteps(samples, sampler))
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 20 and sum(losses[-3:]) / 3 < 0.8 * losses[0], losses
    assert shapes == {(torch.Size([96]), torch.Size([13]))}


def test_flattening_collator_with_accumulation_trains_as_padded_batches(tmp_path):
    """Padding-free training in Hugging Face's Trainer (DataCollatorWithFlattening, gradient
    accumulation) on a patched GPT-2: the same targets as the padded batches of the same
    samples (each sequence's tokens after its first), the same num_items_in_batch, so the same
    losses and the same weights after three optimizer steps; nothing attends across sequences."""
    gpt2 = transformers.GPT2Config(vocab_size=101, n_positions=40, n_embd=32, n_layer=2, n_head=4,
                                   resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": torch.randint(5, 101, (int(n),), generator=g).tolist()}
            for n in torch.randint(3, 14, (24,), generator=g)]

    def padded(batch):
        width = max(len(r["input_ids"]) for r in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(batch):
            ids[i, :len(r["input_ids"])] = torch.tensor(r["input_ids"])
            mask[i, :len(r["input_ids"])] = 1
        labels = ids.masked_fill(mask == 0, -100)
        labels[:, 0] = -100  # never a target; the flattening collator marks it so, and Trainer
        return dict(input_ids=ids, attention_mask=mask, labels=labels)  # counts what is marked

    torch.manual_seed(0)
    start = transformers.GPT2LMHeadModel(gpt2)
    runs = []
    for collator in (transformers.DataCollatorWithFlattening(), padded):
        model = copy.deepcopy(start)
        fusedlm.patch(model)
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4,
            gradient_accumulation_steps=2, learning_rate=0.5, lr_scheduler_type="constant",
            optim="sgd", max_grad_norm=0.0, logging_steps=1, save_strategy="no",
            report_to="none", use_cpu=True, disable_tqdm=True, remove_unused_columns=False)
        trainer = transformers.Trainer(model=model, args=args, data_collator=collator,
                                       train_dataset=rows)
        trainer.train()
        runs.append(([h["loss"] for h in trainer.state.log_history if "loss" in h], model))
    (flat_losses, flat), (pad_losses, pad) = runs
    assert len(flat_losses) == 3 and flat_losses == pytest.approx(pad_losses, rel=1e-4)
    for (n, p), q, p0 in zip(flat.named_parameters(), pad.parameters(), start.parameters()):
        assert (p - q).norm() <= 1e-3 * (q - p0).norm() + 1e-6, n
