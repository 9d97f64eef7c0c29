"""LongAlign supervised fine-tuning: naive, sorted or packed batches on HF Trainer (+ DeepSpeed).

    deepspeed train.py --model_name_or_path THUDM/chatglm3-6b-base --train_file ./data/chatglm/10k \
        --output_dir ./output/chatglm_pack --batch_method pack --pack_loss \
        --deepspeed ds_config/stage3.json --bf16 --gradient_checkpointing ...

--train_file is a pre_tokenize.py dataset (used as is by --batch_method naive); sort and pack read
its `sort/` and `pack/` subdirectories written by sort_and_group.py (DESIGN.md §1-2). The model
family comes from the checkpoint's config.json (model_type chatglm or llama); the model is the
family's transformers class with LongAlign's packed attention and weighted loss
(longalign/modeling/), and every saved checkpoint loads without this repository (Llama: stock
transformers; ChatGLM: with its remote code, `trust_remote_code=True`), its tokenizer carrying
the training chat template. Data order, loss normalisation and logs: longalign/train/trainer.py;
batches and loss weights: longalign/train/collators.py. Every standard TrainingArguments flag applies.
A non-finite loss or gradient norm stops the run naming the step, and NaN/inf weights are never
saved (--nan_policy skip: such steps are skipped, counted; longalign/train/divergence.py).

Speed (longalign/train/speed/memory_model.py), logged in one line at start: on CUDA, without flags, the
recompute policy is the fastest whose predicted peak memory fits the GPU (replacing
--gradient_checkpointing), decoder layers are compiled (not under ZeRO-3), the attention backend
is longalign.ops.varlen_attention's automatic choice. --recompute / --compile_layers [false] / --liger
override; --paper_exact runs the paper's settings unchanged. Off CUDA only explicit flags apply.
--sequence_parallel_size N splits each pack across N GPUs on DeepSpeed's Ulysses, with the same
loss as N = 1 (longalign/train/sequence_parallel.py; sort_and_group.py --group_size W / N).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field

import torch
from transformers import HfArgumentParser, TrainingArguments

from longalign.arguments import check_seed
from longalign.data.jinja_template import attach_chat_template
from longalign.train.collators import BATCH_METHODS, LOSS_REDUCTIONS, build_collator, with_row_index
from longalign.train.divergence import NAN_POLICIES, SKIPPED_LOG_KEY, check_nan_policy
from longalign.modeling.checkpoints import SelfDescribingCheckpoints, make_self_describing
from longalign.modeling.loading import load_training_model, load_training_tokenizer, model_family, pad_token_id
from longalign.train.speed.memory_model import (SpeedRequest, SpeedSettings, apply_speed_settings, longest_row_tokens,
                                   training_speed_settings)
from longalign.train.progress import PROGRESS_STYLES, use_progress_style
from longalign.train.run_state import fingerprint_callback, start_run
from longalign.train.sequence_parallel import SequenceParallelPlan, check_sequence_parallel_layout, parallelism_config
from longalign.train.dataset_loading import load_train_dataset
from longalign.train.trainer import (DEFAULT_PEAK_TFLOPS, LOSS_DENOMINATORS, LongAlignTrainer, close_process_group,
                               resolve_loss_reduction)
from longalign.data.validation import check_sort_pack_pair, dataset_directory, validate_training_dataset


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
        "help": "activation recompute policy of longalign/ops/recompute.py: full | selective | offload | none | "
                "full:K | selective:K | offload:K (first K layers; offload: selective's tensors in host memory); "
                "replaces --gradient_checkpointing. Default on "
                "CUDA: the fastest policy whose predicted peak fits the GPU (longalign/train/speed/memory_model.py); "
                "elsewhere and with --paper_exact: --gradient_checkpointing's transformers checkpointing"})
    compile_layers: bool | None = field(default=None, metadata={
        "nargs": "?", "const": True,
        "help": "torch.compile each decoder layer (dynamic shapes). Default: on with CUDA (off under "
                "ZeRO-3 and with --liger, not measured there), off elsewhere; --compile_layers false: off"})
    paper_exact: bool = field(default=False, metadata={
        "help": "the paper's settings unchanged: transformers' gradient checkpointing as the flags say, no "
                "compile, no automatic recompute policy (LongAlign's own speed choices all off)"})
    liger: bool = field(default=False, metadata={
        "help": "Llama on CUDA: liger-kernel's RMSNorm/SwiGLU/RoPE (longalign/train/speed/liger.py; replaces "
                "transformers' modeling_llama functions process-wide); the weighted loss stays LongAlign's"})
    rope_ratio: float | None = field(default=None, metadata={
        "help": "ChatGLM only: RoPE base = 10000 * rope_ratio. Default: read from the checkpoint (its "
                "config.json, or a ratio hard-coded in its modeling_chatglm.py); an error if it has none"})
    original_warmup_packs: bool = field(default=False, metadata={
        "help": "pack only: the original code's first 32 packs cut to 32,768 tokens with doubled 1/N_k weights "
                "(its dataset.py; README differences)"})
    loss_denominator: str = field(default="step", metadata={
        "choices": list(LOSS_DENOMINATORS),
        "help": "step: one count per optimizer step (the same gradient for any ranks x accumulation split); "
                "micro_step: the original's mean per micro-step, averaged over gradient accumulation"})
    sequence_parallel_size: int = field(default=1, metadata={
        "help": "GPUs that share each pack (DeepSpeed Ulysses / ALST; needs --deepspeed, --batch_method pack, "
                "per-device batch 1; heads divisible by it). Data-parallel size = world size / this"})
    trust_remote_code: bool = field(default=False, metadata={
        "help": "allow the tokenizer folder's own Python code to run (ChatGLM3's tokenizer is remote code); "
                "the model always loads through this package's code"})
    nan_policy: str = field(default="stop", metadata={
        "choices": list(NAN_POLICIES),
        "help": "a non-finite loss or gradient norm: stop the run naming the step (default), or skip that "
                "batch's optimizer step, counted as nonfinite_steps_skipped in the logs (longalign/train/divergence.py)"})
    progress: str = field(default="logs", metadata={
        "choices": list(PROGRESS_STYLES),
        "help": "logs: transformers' progress output (a printed dict per log); bar: one progress bar with "
                "the latest loss in it (longalign/train/progress.py); the logs still reach trainer_state.json"})
    overwrite_output_dir: bool = field(default=False, metadata={
        "help": "a fresh run into a used --output_dir moves the previous run into <output_dir>/replaced-<time>/ "
                "(nothing is deleted; longalign/train/run_state.py)"})


def build_parser() -> HfArgumentParser:
    parser = HfArgumentParser((LongAlignArguments, TrainingArguments))
    # Columns are chosen by our collators (num_sequences etc. are not forward arguments). A non-finite
    # loss is logged as it is, not as the mean of earlier losses (longalign/train/divergence.py).
    parser.set_defaults(report_to="none", remove_unused_columns=False, logging_nan_inf_filter=False)
    return parser


def parse_args(argv=None) -> tuple[LongAlignArguments, TrainingArguments]:
    """Parse the command line (argv=None: sys.argv[1:]); bad combinations raise ValueError."""
    args, training_args = build_parser().parse_args_into_dataclasses(args=argv)
    if training_args.remove_unused_columns:
        raise ValueError("--remove_unused_columns must stay False: the collators select the columns")
    args.loss_reduction = resolve_loss_reduction(args.batch_method, args.pack_loss, args.loss_reduction)
    check_nan_policy(args.nan_policy, training_args.deepspeed, training_args.fp16)
    check_seed("--seed", training_args.seed)
    check_seed("--data_seed", training_args.data_seed)
    speed_request(args)  # conflicting speed flags fail here, before any loading
    sp = args.sequence_parallel_size
    data_parallel = check_sequence_parallel_layout(sp, training_args.world_size, training_args.per_device_train_batch_size,
                                                   args.batch_method, bool(training_args.deepspeed))
    if sp > 1:
        training_args.parallelism_config = parallelism_config(sp, data_parallel)
    return args, training_args


def speed_request(args: LongAlignArguments) -> SpeedRequest:
    """The speed flags as given (None: automatic); a ValueError for --paper_exact with overrides."""
    return SpeedRequest(args.paper_exact, args.recompute, args.compile_layers, args.liger)


def choose_and_apply_speed_settings(model, args, training_args: TrainingArguments, dataset) -> SpeedSettings:
    """Choose (longalign/train/speed/memory_model.py) and apply the recompute policy, layer compile and kernels."""
    settings = training_speed_settings(
        speed_request(args), model, training_args.device,
        tokens=longest_row_tokens(dataset) * training_args.per_device_train_batch_size // args.sequence_parallel_size,
        packed=args.batch_method == "pack", world_size=training_args.world_size, ds_config=training_args.deepspeed,
        act_bytes=2 if (training_args.bf16 or training_args.fp16) else 4)
    if apply_speed_settings(model, settings):
        # our wrappers own each layer's checkpointing; transformers' would wrap it a second time
        training_args.gradient_checkpointing = False
    return settings


def model_dtype(training_args: TrainingArguments) -> torch.dtype:
    """bf16 weights under DeepSpeed --bf16 (ZeRO keeps fp32 masters itself), else fp32 masters."""
    return torch.bfloat16 if (training_args.bf16 and training_args.deepspeed) else torch.float32


@dataclass(frozen=True)
class BuiltTraining:
    """What build_training made: the trainer and the settings main() reports and saves with."""
    trainer: LongAlignTrainer
    args: LongAlignArguments
    family: str
    speed_settings: SpeedSettings


def build_training(argv=None, callbacks=None) -> BuiltTraining:
    """Everything train() needs, from command-line arguments (used by main and the tests)."""
    args, training_args = parse_args(argv)
    dataset, group_size = load_train_dataset(args.train_file, args.batch_method)
    if args.batch_method != "naive":
        check_sort_pack_pair(args.train_file)
    fingerprint = start_run(dataset_directory(dataset), training_args, args.overwrite_output_dir,
                            [args.model_name_or_path, args.train_file, args.tokenizer_name, training_args.deepspeed],
                            {"train_file": args.train_file, "batch_method": args.batch_method,
                             "model_name_or_path": args.model_name_or_path})
    family = model_family(args.model_name_or_path)
    model = load_training_model(args.model_name_or_path, dtype=model_dtype(training_args), rope_ratio=args.rope_ratio)
    validate_training_dataset(dataset, model.get_input_embeddings().num_embeddings, args.batch_method == "pack",
                              str(dataset_directory(dataset)))  # every row, before the first step
    speed = choose_and_apply_speed_settings(model, args, training_args, dataset)
    sequence_parallel = SequenceParallelPlan(args.sequence_parallel_size, training_args.world_size)
    sequence_parallel.prepare_model(model.config)
    tokenizer = load_training_tokenizer(args.tokenizer_name or args.model_name_or_path,
                                        trust_remote_code=args.trust_remote_code,
                                        required=args.tokenizer_name is not None)
    if tokenizer is not None:
        attach_chat_template(tokenizer, family)  # saved with every checkpoint: the training format
    pad_id = pad_token_id(tokenizer, model.config) if args.batch_method != "pack" else None
    if args.original_warmup_packs:
        dataset = with_row_index(dataset)  # the collator cuts the first packs of the stored order
    collator = build_collator(args.batch_method, args.loss_reduction, pad_id, args.original_warmup_packs)
    collator = sequence_parallel.wrap_collator(collator)  # SP: shifted over the whole pack for Ulysses
    callbacks = [SelfDescribingCheckpoints(family), fingerprint_callback(fingerprint), *(callbacks or [])]
    trainer = LongAlignTrainer(model=model, args=training_args, train_dataset=dataset, data_collator=collator,
                               processing_class=tokenizer, callbacks=callbacks, batch_method=args.batch_method,
                               loss_reduction=args.loss_reduction, group_size=group_size,
                               peak_tflops=args.peak_tflops, loss_denominator=args.loss_denominator,
                               sequence_parallel=sequence_parallel, nan_policy=args.nan_policy)
    use_progress_style(trainer, args.progress)
    return BuiltTraining(trainer, args, family, speed)


def build_trainer(argv=None, callbacks=None) -> LongAlignTrainer:
    """The trainer of `build_training` (bench scripts and tests that only run it)."""
    return build_training(argv, callbacks).trainer


def main(argv=None) -> LongAlignTrainer:
    built = build_training(argv)
    trainer, args = built.trainer, built.args
    if trainer.is_world_process_zero():
        print(f"batch_method={args.batch_method} loss_reduction={args.loss_reduction} "
              f"rows={len(trainer.train_dataset)} world_size={trainer.args.world_size} "
              f"sequence_parallel_size={args.sequence_parallel_size}", flush=True)
        print(built.speed_settings.log_line(), flush=True)
    trainer.train(resume_from_checkpoint=trainer.args.resume_from_checkpoint)
    trainer.divergence.check_weights(trainer.model, f"step {trainer.state.global_step}: the final model")
    trainer.save_model(trainer.args.output_dir)  # HF format (ZeRO-3: gathered 16-bit weights)
    trainer.save_state()
    if trainer.is_world_process_zero():
        make_self_describing(trainer.args.output_dir, built.family)
        print(f"model saved to {trainer.args.output_dir}", flush=True)
        if trainer.divergence.skipped:
            print(f"warning: {trainer.divergence.skipped} optimizer steps skipped for a non-finite loss or gradient "
                  f"norm (--nan_policy skip; {SKIPPED_LOG_KEY} in trainer_state.json)", file=sys.stderr, flush=True)
    close_process_group()
    return trainer


if __name__ == "__main__":
    main()
