"""LongAlign supervised fine-tuning: naive, sorted or packed batches on HF Trainer (+ DeepSpeed).

    deepspeed train.py --model_name_or_path THUDM/chatglm3-6b-base --train_file ./data/chatglm/10k \
        --output_dir ./output/chatglm_pack --batch_method pack --pack_loss \
        --deepspeed ds_config/stage3.json --bf16 --gradient_checkpointing ...

--train_file is a pre_tokenize.py dataset (used as is by --batch_method naive); sort and pack read
its `sort/` and `pack/` subdirectories written by sort_and_group.py (DESIGN.md §1-2). The model
family comes from the checkpoint's config.json (model_type chatglm -> modeling_chatglm.py,
llama -> modeling_llama.py). Data order, loss normalisation and logs: longalign/trainer.py;
batches and loss weights: longalign/collators.py. Every standard TrainingArguments flag applies.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import HfArgumentParser, TrainingArguments

from longalign.collators import BATCH_METHODS, LOSS_REDUCTIONS, build_collator
from longalign.trainer import DEFAULT_PEAK_TFLOPS, LongAlignTrainer, resolve_loss_reduction

sys.path.insert(0, str(Path(__file__).resolve().parent))  # modeling_*.py live beside this file


@dataclass
class LongAlignArguments:
    model_name_or_path: str = field(metadata={"help": "HF checkpoint directory or hub id"})
    train_file: str = field(metadata={"help": "pre_tokenize.py output directory (with sort/ and pack/)"})
    batch_method: str = field(default="naive", metadata={"choices": list(BATCH_METHODS),
                                                         "help": "naive | sort | pack (paper §3.2)"})
    pack_loss: bool = field(default=False, metadata={"help": "pack only: weight each sequence 1/N_k (Eq. 2)"})
    loss_reduction: str | None = field(default=None, metadata={
        "choices": list(LOSS_REDUCTIONS),
        "help": "default: sequence (pack+--pack_loss, naive, sort), pack_mean (pack)"})
    tokenizer_name: str | None = field(default=None, metadata={
        "help": "tokenizer for the pad id of naive/sort batches (default: the model's directory)"})
    peak_tflops: float = field(default=DEFAULT_PEAK_TFLOPS, metadata={
        "help": "per-GPU dense bf16 peak in TFLOP/s for the logged MFU"})
    recompute: str | None = field(default=None, metadata={
        "help": "activation recompute policy of longalign/recompute.py: full | selective | none | "
                "full:K | selective:K (first K layers). Replaces --gradient_checkpointing; default: "
                "that flag's transformers checkpointing. BENCHMARKS.md §4: selective 1.15x over full"})
    compile_layers: bool = field(default=False, metadata={
        "help": "torch.compile each decoder layer (dynamic shapes); BENCHMARKS.md §4: ~1.1-1.15x"})


def build_parser() -> HfArgumentParser:
    parser = HfArgumentParser((LongAlignArguments, TrainingArguments))
    # Columns are chosen by our collators (num_sequences etc. are not forward arguments).
    parser.set_defaults(report_to="none", remove_unused_columns=False)
    return parser


def parse_args(argv=None) -> tuple[LongAlignArguments, TrainingArguments]:
    """Parse the command line (argv=None: sys.argv[1:]); bad combinations raise ValueError."""
    args, training_args = build_parser().parse_args_into_dataclasses(args=argv)
    if training_args.remove_unused_columns:
        raise ValueError("--remove_unused_columns must stay False: the collators select the columns")
    args.loss_reduction = resolve_loss_reduction(args.batch_method, args.pack_loss, args.loss_reduction)
    if args.recompute is not None or args.compile_layers:
        # our wrappers own each layer's checkpointing; transformers' would wrap it a second time
        training_args.gradient_checkpointing = False
    return args, training_args


def model_family(model_path: str) -> str:
    """'chatglm' or 'llama' from the checkpoint's config.json model_type."""
    config_file = Path(model_path) / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"--model_name_or_path {model_path}: no config.json (download the checkpoint first)")
    model_type = json.loads(config_file.read_text()).get("model_type")
    if model_type not in ("chatglm", "llama"):
        raise ValueError(f"{config_file}: model_type {model_type!r}; supported: 'chatglm', 'llama'")
    return model_type


def model_class(family: str):
    if family == "chatglm":
        from modeling_chatglm import ChatGLMForConditionalGeneration
        return ChatGLMForConditionalGeneration
    from modeling_llama import LlamaForCausalLM
    return LlamaForCausalLM


def load_model(model_path: str, training_args: TrainingArguments):
    """The family's class from_pretrained; bf16 weights under DeepSpeed --bf16, else fp32 masters."""
    dtype = torch.bfloat16 if (training_args.bf16 and training_args.deepspeed) else torch.float32
    return model_class(model_family(model_path)).from_pretrained(model_path, dtype=dtype)


def load_train_dataset(train_file: str, batch_method: str):
    """(dataset, group_size) for the method; group_size from <dir>/stats.json (None for naive)."""
    import datasets

    directory = Path(train_file) if batch_method == "naive" else Path(train_file) / batch_method
    if not directory.is_dir():
        hint = "run pre_tokenize.py" if batch_method == "naive" else f"run sort_and_group.py --train_file {train_file}"
        raise FileNotFoundError(f"{directory}: no dataset for --batch_method {batch_method} ({hint})")
    dataset = datasets.load_from_disk(str(directory))
    if not isinstance(dataset, datasets.Dataset):
        raise ValueError(f"{directory}: expected one Dataset, found {type(dataset).__name__}")
    needed = {"input_ids", "labels"} | ({"cu_seqlens"} if batch_method == "pack" else set())
    if needed - set(dataset.column_names):
        raise ValueError(f"{directory}: missing columns {sorted(needed - set(dataset.column_names))} (DESIGN.md §1-2)")
    if batch_method == "naive":
        return dataset, None
    stats_file = directory / "stats.json"
    if not stats_file.is_file():
        raise FileNotFoundError(f"{stats_file}: missing; the group size of the stored order is read from it")
    group_size = json.loads(stats_file.read_text()).get("group_size")
    if not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"{stats_file}: group_size must be a positive int, got {group_size!r}")
    return dataset, group_size


def load_tokenizer(args: LongAlignArguments):
    """The tokenizer of --tokenizer_name or the model directory, or None when there is none."""
    from transformers import AutoTokenizer

    name = args.tokenizer_name or args.model_name_or_path
    try:
        return AutoTokenizer.from_pretrained(name, trust_remote_code=True)
    except (OSError, ValueError):
        if args.tokenizer_name:
            raise
        return None


def pad_token_id(tokenizer, config) -> int | None:
    """Pad id: the tokenizer's, else the config's pad, else its eos (padding is masked anyway)."""
    for value in (getattr(tokenizer, "pad_token_id", None), getattr(config, "pad_token_id", None),
                  getattr(config, "eos_token_id", None)):
        if isinstance(value, (list, tuple)):
            value = value[0] if value else None
        if value is not None:
            return int(value)
    return None


def build_trainer(argv=None, callbacks=None) -> LongAlignTrainer:
    """Everything train() needs, from command-line arguments (used by main and the tests)."""
    args, training_args = parse_args(argv)
    dataset, group_size = load_train_dataset(args.train_file, args.batch_method)
    model = load_model(args.model_name_or_path, training_args)
    if args.recompute is not None or args.compile_layers:
        from longalign.recompute import apply_recompute

        apply_recompute(model, args.recompute or "none", compile=args.compile_layers)
    tokenizer = load_tokenizer(args)
    pad_id = pad_token_id(tokenizer, model.config) if args.batch_method != "pack" else None
    collator = build_collator(args.batch_method, args.loss_reduction, pad_id)
    trainer = LongAlignTrainer(model=model, args=training_args, train_dataset=dataset, data_collator=collator,
                               processing_class=tokenizer, callbacks=callbacks, batch_method=args.batch_method,
                               loss_reduction=args.loss_reduction, group_size=group_size,
                               peak_tflops=args.peak_tflops)
    trainer.longalign_args = args
    return trainer


def main(argv=None) -> LongAlignTrainer:
    trainer = build_trainer(argv)
    args = trainer.longalign_args
    if trainer.is_world_process_zero():
        print(f"batch_method={args.batch_method} loss_reduction={args.loss_reduction} "
              f"rows={len(trainer.train_dataset)} world_size={trainer.args.world_size}", flush=True)
    trainer.train(resume_from_checkpoint=trainer.args.resume_from_checkpoint)
    trainer.save_model(trainer.args.output_dir)  # HF format (ZeRO-3: gathered 16-bit weights)
    trainer.save_state()
    if trainer.is_world_process_zero():
        print(f"model saved to {trainer.args.output_dir}", flush=True)
    return trainer


if __name__ == "__main__":
    main()
