"""The model card (README.md) of the demo's pretrained base, written from its stats.json."""
from __future__ import annotations

from pathlib import Path

from longalign.storage import write_bytes_atomic


def card_text(stats: dict) -> str:
    config, held_out = stats["config"], stats["held_out"]
    flags = " ".join(f"--{k} {v}" for k, v in config.items())
    rows = "\n".join(f"| {name} | {m['exact']:.0%} of {m['examples']} | {m['context']} |"
                     for name, m in held_out.items())
    stopped = (f"; stopped by --time_limit {config['time_limit']:g} s of {config['steps']} steps"
               if stats["steps_trained"] < config["steps"] else "")
    short_phase = (f"; the first {config['short_steps']} steps at {config['short_context']} tokens, as many "
                   "tokens a step" if config.get("short_steps") else "")
    alphabet = (f", each span from an alphabet of {config['soup_alphabet']} to {stats['vocab_size']} pieces "
                "(log-uniform)" if config.get("soup_alphabet") else "")
    soup = (f"; then {stats['soup_documents']:,} token-soup documents over the tokenizer's vocabulary{alphabet}"
            if stats.get("soup_documents") else "")
    probes = [entry for entry in stats["loss_log"] if "copy_token_accuracy" in entry]
    trace = ("\n- copy token accuracy on held-out copy examples during training (step: share): "
             + ", ".join(f"{e['step']}: {e['copy_token_accuracy']:.2f}" for e in probes[:: max(1, len(probes) // 12)])
             if probes else "")
    losses = [entry for entry in stats["loss_log"] if "loss" in entry]
    mix = ", ".join(f"{kind} {share:.0%}" for kind, share in stats["document_mix"].items())
    return f"""# tiny-base: the pretrained base of LongAlign's offline demo

A {stats['parameters']:,}-parameter Llama ({config['layers']} layers, hidden {config['hidden']}, \
{config['heads']} heads, tied embeddings, {stats['vocab_size']}-entry byte-level BPE) pretrained with the
plain next-token loss on every token of generated text rich in repetition, at a context of
{config['context']} tokens. It is the miniature's stand-in for Llama-2 / ChatGLM3: `make demo`
aligns it with LongAlign on long instruction data at 4x this context. It knows no chat format
and no question form. Load it with `AutoModelForCausalLM.from_pretrained(<this folder>)`.

## How it was made
- command: `python -m longalign.demo.pretrain --out <folder> {flags}`
- device: {stats['device']}; date: {stats['date']}
- data: {stats['documents'] - stats.get('soup_documents', 0):,} documents from `longalign.demo.corpus` (seed {config['seed']}): {mix}{soup};
  {stats['tokens_trained']:,} tokens trained ({stats['steps_trained']} steps of {config['batch']} windows{stopped}{short_phase})
- time: {stats['data_seconds']} s data + tokenizer, {stats['train_seconds']} s training and evaluation;
  final training loss {losses[-1]['loss']}{trace}

## What it measured (held-out, `longalign.demo.base_eval`, exact span under teacher forcing)
| measure | exact | context tokens |
|---|---|---|
{rows}

copy: a list of nonsense words quoted again after filler; recall: a fact's value after
"Remember: The <key> is", with 2-5 facts in the filler. stats.json holds every figure.
"""


def write_card(path: str | Path, stats: dict) -> None:
    write_bytes_atomic(path, card_text(stats).encode("utf-8"))
