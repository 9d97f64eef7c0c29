"""The pre_tokenize stage: read long + short conversations, tokenize, write an Arrow dataset.

Output (DESIGN.md §1) at `output_dir`, written through `longalign.storage.atomic_dir`:
- the `datasets` Arrow files (`save_to_disk`): columns input_ids, labels — int32, unpadded;
- `stats.json`: per source, what was read (`container`: jsonl / json_array / parquet / hf_dataset,
  `compression`, `rows_by_format`: messages / sharegpt / none, `system_prompts`), rows read /
  kept (written, truncated ones included) / truncated / skipped_too_long / skipped_invalid (by
  kind) / skipped_no_target, token totals, a length histogram, rows cut to the text budget
  before tokenizing (`rows_cut_before_tokenizing`, `chars_cut_before_tokenizing`:
  longalign.data.text_budget; their `tokens_before_truncation` count the cut text), and what
  labelling met: `empty_replies_masked` (replies with nothing but whitespace / zero-width
  characters, masked with their EOS target), `reply_edges_stripped` (replies whose edge
  whitespace was removed), `ids_differ_from_whole_text` (rows whose segment ids differ from
  tokenizing the whole text: a merge crossed a reply boundary; see tokenization.py); plus
  on-disk bytes per token and throughput;
- `invalid_rows.jsonl`: one line per bad input row (source, file, line or row number, kind, reason).
Per source: rows_read == kept + skipped_too_long + skipped_invalid + skipped_no_target.
"""
from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from longalign.constants import DEFAULT_LONG_JSONL, LONGALIGN_HF_DATASET, TOKEN_COLUMNS
from longalign.data.conversations import Conversation, InvalidRow, SourceRows
from longalign.data.input_files import (DATA_HELP, SourceSpec, check_usable, parse_source, read_source,
                                   row_format_counts)
from longalign.storage import atomic_dir, check_output_dir, write_json_atomic
from longalign.data.training_format import reply_text, system_segments
from longalign.remote_code import load_tokenizer
from longalign.data.tokenization import (KEPT, SKIPPED_NO_TARGET, SKIPPED_TOO_LONG, TRUNCATED,
                                    ConversationTokenizer, TokenizedExample, control_token_id, tokenize_all)

STAGE = "pre_tokenize"  # the writer named in the output folder's marker (longalign.storage)
INVALID_REPORT = "invalid_rows.jsonl"
STATS_FILE = "stats.json"


@dataclass
class PretokenizeConfig:
    family: str
    tokenizer: str
    long_path: str | None  # file or dataset (longalign.data.input_files); None: DEFAULT_LONG_JSONL, or the
    # HF dataset when that file is missing
    short_path: str  # file or dataset
    datanum: int  # first N long rows; all short rows
    max_length: int
    truncate: str
    num_proc: int
    output_dir: str
    strict: bool = False
    batch_size: int = 64  # conversations per batched tokenizer call / per pool task
    overwrite_output_dir: bool = False  # replace a previous output that holds other files too
    trust_remote_code: bool = False  # allow a tokenizer that ships Python code (ChatGLM3's)
    shuffle_seed: int | None = None  # None: input order (long rows, then short); else a seeded shuffle


# ---- inputs -------------------------------------------------------------------------------
HF_LONG_HINT = (f"{DEFAULT_LONG_JSONL} does not exist, so the HF dataset {LONGALIGN_HF_DATASET} was loaded. "
                f"Offline? Download it where there is internet and put it at {DEFAULT_LONG_JSONL} or pass "
                f"--long PATH; {DATA_HELP}")


def long_spec(path: str | None) -> SourceSpec:
    """What --long names: the value given, else DEFAULT_LONG_JSONL, else the HF dataset."""
    if path is not None:  # only the default path falls back to the hub: a typo must not download 10k rows
        return parse_source(path, "long")
    if Path(DEFAULT_LONG_JSONL).exists():
        return parse_source(DEFAULT_LONG_JSONL, "long")
    return SourceSpec(LONGALIGN_HF_DATASET, "dataset", LONGALIGN_HF_DATASET)


def check_distinct_sources(long: SourceSpec | None, short: SourceSpec) -> None:
    """The same data as --long and --short would be used twice, every row doubled: refuse."""
    if long is not None and long.identity() == short.identity():
        raise ValueError(f"--long {long.value} and --short {short.value} name the same data "
                         f"({short.identity()[1]}): every row would be used twice; pass it to one of them (and "
                         "an empty file, or other data, to the other)")


# ---- stats --------------------------------------------------------------------------------
def length_bucket(length: int) -> str:
    """Power-of-two bucket label, e.g. 700 -> '512-1023'."""
    low = 1 << (max(length, 1).bit_length() - 1)
    return f"{low}-{2 * low - 1}"


@dataclass
class SourceStats:
    origin: str
    requested: int | None
    available: int | None
    container: str | None = None
    compression: str | None = None
    rows_by_format: dict = dataclasses.field(default_factory=dict)
    system_prompts: int = 0
    rows_read: int = 0
    blank_lines: int = 0
    byte_order_marks_removed: int = 0
    kept: int = 0
    truncated: int = 0
    skipped_too_long: int = 0
    skipped_invalid: int = 0
    skipped_no_target: int = 0
    dropped_trailing_user_turns: int = 0
    zero_width_chars_removed: int = 0
    reply_edges_stripped: int = 0
    empty_replies_masked: int = 0
    ids_differ_from_whole_text: int = 0
    rows_cut_before_tokenizing: int = 0
    chars_cut_before_tokenizing: int = 0
    tokens: int = 0
    target_tokens: int = 0
    tokens_before_truncation: int = 0
    skipped_invalid_by_kind: dict = dataclasses.field(default_factory=dict)
    length_histogram: dict = dataclasses.field(default_factory=dict)

    def as_dict(self) -> dict:
        out = dataclasses.asdict(self)
        by_low_end = sorted(self.length_histogram.items(), key=lambda item: int(item[0].split("-")[0]))
        out["length_histogram"] = dict(by_low_end)
        return out

    @classmethod
    def of_source(cls, source: SourceRows, requested: int | None) -> SourceStats:
        return cls(source.origin, requested, source.available, source.container, source.compression,
                   row_format_counts(source), rows_read=len(source.rows), blank_lines=source.blank_lines,
                   byte_order_marks_removed=int(source.byte_order_mark))

    def add_invalid(self, row: InvalidRow) -> None:
        self.skipped_invalid += 1
        self.skipped_invalid_by_kind[row.kind] = self.skipped_invalid_by_kind.get(row.kind, 0) + 1

    def add_conversation(self, conversation: Conversation) -> None:
        self.dropped_trailing_user_turns += int(conversation.dropped_trailing_user)
        self.zero_width_chars_removed += conversation.zero_width_removed
        self.reply_edges_stripped += sum(reply != reply_text(reply) for _, reply in conversation.rounds)
        self.system_prompts += int(conversation.system is not None)

    def add_example(self, example: TokenizedExample) -> None:
        self.tokens_before_truncation += example.length_before_truncation
        self.empty_replies_masked += example.empty_replies
        self.ids_differ_from_whole_text += int(example.differs_from_whole_text)
        self.rows_cut_before_tokenizing += int(example.cut_chars > 0)
        self.chars_cut_before_tokenizing += example.cut_chars
        if example.status == SKIPPED_TOO_LONG:
            self.skipped_too_long += 1
            return
        if example.status == SKIPPED_NO_TARGET:
            self.skipped_no_target += 1
            return
        assert example.status in (KEPT, TRUNCATED), example.status
        self.kept += 1
        self.truncated += int(example.status == TRUNCATED)
        length = len(example.input_ids)
        self.tokens += length
        self.target_tokens += example.num_targets
        bucket = length_bucket(length)
        self.length_histogram[bucket] = self.length_histogram.get(bucket, 0) + 1


def _total(per_source: dict[str, SourceStats]) -> dict:
    keys = ("rows_read", "kept", "truncated", "skipped_too_long", "skipped_invalid", "skipped_no_target",
            "empty_replies_masked", "reply_edges_stripped", "ids_differ_from_whole_text", "system_prompts",
            "rows_cut_before_tokenizing", "tokens", "target_tokens", "tokens_before_truncation")
    return {key: sum(getattr(stats, key) for stats in per_source.values()) for key in keys}


# ---- output -------------------------------------------------------------------------------
def _record_batch(examples: list[TokenizedExample]):
    """One Arrow record batch of list<int32> columns (its own offsets: no 2^31 limit overall)."""
    import pyarrow as pa

    lengths = np.fromiter((len(e.input_ids) for e in examples), dtype=np.int64, count=len(examples))
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    columns = {
        "input_ids": np.concatenate([e.input_ids for e in examples]) if examples else np.zeros(0, np.int32),
        "labels": np.concatenate([e.labels for e in examples]) if examples else np.zeros(0, np.int32),
    }
    arrays = [pa.ListArray.from_arrays(offsets, pa.array(columns[name], type=pa.int32())) for name in TOKEN_COLUMNS]
    return pa.RecordBatch.from_arrays(arrays, names=list(TOKEN_COLUMNS))


def save_dataset(record_batches: list, out_dir: Path) -> int:
    """save_to_disk the batches into `out_dir`; return the bytes of the Arrow files written."""
    import datasets
    import pyarrow as pa

    schema = pa.schema([(name, pa.list_(pa.int32())) for name in TOKEN_COLUMNS])
    table = pa.Table.from_batches(record_batches, schema=schema)
    datasets.Dataset(table).save_to_disk(str(out_dir))
    return sum(path.stat().st_size for path in out_dir.glob("*.arrow"))


# ---- the stage ----------------------------------------------------------------------------
def _check_config(config: PretokenizeConfig) -> None:
    from longalign.constants import TRUNCATION_MODES
    from longalign.constants import check_family

    check_family(config.family)
    if config.truncate not in TRUNCATION_MODES:
        raise ValueError(f"--truncate must be one of {TRUNCATION_MODES}, got {config.truncate!r}")
    for name in ("max_length", "num_proc", "batch_size"):
        if getattr(config, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(config, name)}")
    if config.datanum < 0:
        raise ValueError(f"datanum must be >= 0, got {config.datanum}")


def _read_sources(config: PretokenizeConfig) -> dict[str, SourceRows]:
    # Short data is checked and read first so a bad file fails before a (possibly long) hub download.
    short = parse_source(config.short_path, "short")
    long = long_spec(config.long_path)
    check_distinct_sources(long if config.datanum else None, short)
    sources = {"short": read_source(short, strict=config.strict)}
    if config.datanum == 0 and long.kind == "dataset":  # 0k: nothing to take, nothing to download
        sources["long"] = SourceRows(origin=f"hf:{long.path} (not loaded: --datanum 0)")
    else:
        sources["long"] = read_source(long, config.datanum, config.strict,
                                      HF_LONG_HINT if config.long_path is None else "")
    for name, flag in (("long", "--long"), ("short", "--short")):
        check_usable(sources[name], flag)
    return {"long": sources["long"], "short": sources["short"]}


def _split_rows(sources: dict[str, SourceRows], requested: dict, stats: dict, report: list):
    """Count invalid rows; return (source name, conversation) for every valid row, in order."""
    tagged = []
    for name, source in sources.items():
        stats[name] = SourceStats.of_source(source, requested[name])
        for row in source.rows:
            if isinstance(row, InvalidRow):
                stats[name].add_invalid(row)
                report.append(row.to_report(name, source.origin, source.unit))
            else:
                stats[name].add_conversation(row)
                tagged.append((name, row))
    return tagged


def check_system_prompts(encoder: ConversationTokenizer, tagged: list, sources: dict[str, SourceRows]) -> None:
    """Refuse, before tokenizing, system turns the family writes with a token the tokenizer lacks."""
    first = next(((name, c) for name, c in tagged if c.system is not None), None)
    if first is None:
        return
    for segment in system_segments(encoder.family, first[1].system):
        try:
            control_token_id(encoder.tokenizer, segment.text)
        except ValueError as err:
            raise ValueError(f"{sources[first[0]].where(first[1].line)} has a system turn, which the "
                             f"{encoder.family} format writes with {segment.text!r}: {err}") from None


def shuffle_rows(tagged: list, seed: int | None) -> list:
    """All rows (long and short together) in a seeded random order, as the original mixes them
    (with an unseeded random.shuffle); `seed=None` keeps the input order.

    tagged=[a b c d], seed -> [tagged[i] for i in default_rng(seed).permutation(4)]
    """
    if seed is None:
        return tagged
    return [tagged[i] for i in np.random.default_rng(seed).permutation(len(tagged))]


def _tokenize(config: PretokenizeConfig, tagged: list, stats: dict) -> list:
    from tqdm import tqdm

    conversations = [conversation.rounds for _, conversation in tagged]
    batches = tokenize_all(conversations, config.tokenizer, config.family, config.max_length,
                           config.truncate, config.num_proc, config.batch_size, config.trust_remote_code,
                           systems=[conversation.system for _, conversation in tagged])
    record_batches, position = [], 0
    total = -(-len(conversations) // config.batch_size)
    for examples in tqdm(batches, total=total, desc="pre_tokenize", unit="batch"):
        for example in examples:
            stats[tagged[position][0]].add_example(example)
            position += 1
        written = [e for e in examples if e.status in (KEPT, TRUNCATED)]
        if written:
            record_batches.append(_record_batch(written))
    return record_batches


def _rate(tokens: int, seconds: float) -> float | None:
    return tokens / seconds if seconds > 0 else None


def _stats_document(config, encoder, per_source, arrow_bytes, seconds, tokenize_seconds) -> dict:
    total = _total(per_source)
    return {
        "config": dataclasses.asdict(config),
        "tokenizer": {"eos_token_id": encoder.eos_id, "prefix_ids": encoder.prefix,
                      "text_route": encoder.encoder.route, "continuation_anchor": encoder.encoder.anchor},
        "sources": {name: s.as_dict() for name, s in per_source.items()},
        "total": total,
        "invalid_report": INVALID_REPORT,
        "arrow_bytes": arrow_bytes,
        "bytes_per_token": arrow_bytes / total["tokens"] if total["tokens"] else None,
        "seconds": seconds,  # whole stage: tokenizer loading, reading, tokenizing, writing
        "tokens_per_s": _rate(total["tokens_before_truncation"], seconds),
        "tokenize_seconds": tokenize_seconds,  # the pool alone (worker start-up included)
        "tokenize_tokens_per_s": _rate(total["tokens_before_truncation"], tokenize_seconds),
    }


def _inputs(config: PretokenizeConfig) -> list:
    return [config.long_path or DEFAULT_LONG_JSONL, config.short_path, config.tokenizer]


def _check_max_length_fits_template(encoder: ConversationTokenizer, config: PretokenizeConfig) -> None:
    """Refuse a --max_length with which no example could keep a target (nothing to write)."""
    from longalign.constants import LEFT_TRUNCATION_KEEP_HEAD

    if config.truncate == "left":
        if config.max_length <= LEFT_TRUNCATION_KEEP_HEAD:
            raise ValueError(f"--truncate left keeps the first {LEFT_TRUNCATION_KEEP_HEAD} tokens and the tail: "
                             f"it needs --max_length > {LEFT_TRUNCATION_KEEP_HEAD}, got {config.max_length}")
        return
    [shortest] = encoder.encode_batch([[("", "")]])  # special tokens + empty round + EOS
    if config.max_length < len(shortest.ids):
        raise ValueError(f"--max_length {config.max_length} is shorter than the {config.family} chat template "
                         f"itself ({len(shortest.ids)} tokens for an empty round and its EOS): with "
                         f"--truncate {config.truncate} no example could keep a target")


def _number(report_row: dict) -> str:
    return f"line {report_row['line']}" if "line" in report_row else f"row {report_row['row']}"


class NothingToWriteError(ValueError):
    """No example survived: a dataset without rows is not written. `stats`: what was counted."""

    def __init__(self, message: str, stats: dict):
        super().__init__(message)
        self.stats = stats


def _check_something_kept(per_source: dict, report: list) -> None:
    """A dataset without rows cannot be read by sort_and_group.py: refuse to write one."""
    total = _total(per_source)
    if total["kept"]:
        return
    first_bad = f"; first invalid row: {report[0]['origin']} {_number(report[0])} ({report[0]['kind']})" \
        if report else ""
    counts = {k: v for k, v in total.items() if k.startswith("skipped") or k == "rows_read"}
    raise NothingToWriteError(f"no example to write ({counts}{first_bad}); nothing was written: check the "
                              "input files, --datanum and --max_length",
                              {"sources": {name: s.as_dict() for name, s in per_source.items()}, "total": total})


def run_pretokenize(config: PretokenizeConfig) -> dict:
    """Run the whole stage; returns the stats that are also saved as stats.json."""
    _check_config(config)
    started = time.perf_counter()
    check_output_dir(config.output_dir, STAGE, config.overwrite_output_dir, _inputs(config))  # fail early
    encoder = ConversationTokenizer(load_tokenizer(config.tokenizer, config.trust_remote_code), config.family)
    _check_max_length_fits_template(encoder, config)
    sources = _read_sources(config)
    per_source, report = {}, []
    tagged = _split_rows(sources, {"long": config.datanum, "short": None}, per_source, report)
    check_system_prompts(encoder, tagged, sources)
    tagged = shuffle_rows(tagged, config.shuffle_seed)
    tokenize_started = time.perf_counter()
    record_batches = _tokenize(config, tagged, per_source)
    tokenize_seconds = time.perf_counter() - tokenize_started
    _check_something_kept(per_source, report)
    with atomic_dir(config.output_dir, stage=STAGE, overwrite=config.overwrite_output_dir,
                    inputs=_inputs(config)) as tmp:
        arrow_bytes = save_dataset(record_batches, tmp)
        stats = _stats_document(config, encoder, per_source, arrow_bytes,
                                time.perf_counter() - started, tokenize_seconds)
        with open(tmp / INVALID_REPORT, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in report)
        write_json_atomic(tmp / STATS_FILE, stats)
    return stats
