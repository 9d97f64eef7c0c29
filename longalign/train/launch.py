"""The DeepSpeed launcher words of scripts/_launch.sh, on one node or several, after one check.

    python -m longalign.train.launch --train_file DATA --batch_method pack --sequence_parallel_size SP \
        --num_gpus G | --hostfile FILE | --nnodes M --node_rank R --master_addr A --num_gpus G --node_hostfile OUT

prints the launcher's words, one a line (train.py and its arguments follow them), once the world
size W fits the dataset's group_size (<train_file>/<batch_method>/stats.json, the rule of
longalign/train/parallel_layout.py): a mismatch stops here, before any node loads a model, with both
numbers and the sort_and_group.py command that fixes it. The three forms (flags mirror the
scripts' environment variables; an empty value means unset):

    one node       deepspeed --num_gpus G --master_port P                           W = G
    HOSTFILE       deepspeed --hostfile FILE --master_port P [--master_addr A]      W = sum of slots=
                   (DeepSpeed starts every host from this one over ssh / pdsh)
    NNODES         deepspeed --hostfile OUT --no_ssh --node_rank R --master_addr A --master_port P
                   (one launcher per node, e.g. a Slurm task; OUT is written here: M hosts of G
                   slots, whose names DeepSpeed uses as labels only under --no_ssh)  W = M G

Standard library only: it runs before any framework is imported.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from longalign.train.parallel_layout import (check_data_parallel_layout, read_layout_stats, rows_per_micro_step,
                                      sort_and_group_command)

HOSTFILE_LINE = re.compile(r"^(\S+)\s+slots=(\d+)")  # DeepSpeed's hostfile format (launcher/runner.py)
NODE_LABEL = "node{}"  # host names of the NNODES form's hostfile (labels under --no_ssh)


def read_hostfile(path: str) -> dict[str, int]:
    """Host -> slots of a DeepSpeed hostfile ('HOST slots=N' lines, '#' comments, blank lines)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"HOSTFILE {path}: no such file")
    hosts = {}
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = HOSTFILE_LINE.match(line)
        if match is None:
            raise ValueError(f"{path}:{number}: expected 'HOST slots=N' (DeepSpeed's hostfile format), got {line!r}")
        host, slots = match.group(1), int(match.group(2))
        if host in hosts:
            raise ValueError(f"{path}:{number}: host {host} is listed twice")
        if slots < 1:
            raise ValueError(f"{path}:{number}: {host} has slots={slots}; each host needs at least one GPU")
        hosts[host] = slots
    if not hosts:
        raise ValueError(f"{path}: no 'HOST slots=N' line")
    return hosts


def whole_number(value: str, name: str, minimum: int) -> int:
    """`value` of environment variable `name` as an integer >= minimum; a clear error otherwise."""
    if not re.fullmatch(r"\d+", value) or int(value) < minimum:
        raise ValueError(f"{name}={value!r}: expected an integer >= {minimum}")
    return int(value)


def launch_plan(args: argparse.Namespace) -> tuple[list[str], int, str]:
    """(launcher words, world size, how the world size was counted) of the form the flags name."""
    port = ["--master_port", str(whole_number(args.master_port, "MASTER_PORT", 1))]
    per_node = args.nnodes or args.node_rank
    if args.hostfile and (per_node or args.num_gpus):
        raise ValueError(f"HOSTFILE is set together with {'NNODES/NODE_RANK' if per_node else 'NUM_GPUS'}: with "
                         "HOSTFILE every host's GPUs are its slots= and DeepSpeed starts all hosts from this one; "
                         "NNODES + NODE_RANK start one launcher per node. Set one of the two.")
    if args.hostfile:
        hosts = read_hostfile(args.hostfile)
        address = ["--master_addr", args.master_addr] if args.master_addr else []
        world = sum(hosts.values())
        return (["deepspeed", "--hostfile", args.hostfile, *address, *port], world,
                f"{len(hosts)} hosts of HOSTFILE {args.hostfile}, slots {' + '.join(map(str, hosts.values()))}")
    gpus = whole_number(args.num_gpus, "NUM_GPUS", 1)
    if not per_node:
        return ["deepspeed", "--num_gpus", str(gpus), *port], gpus, f"one node of NUM_GPUS={gpus}"
    missing = [name for name, value in (("NNODES", args.nnodes), ("NODE_RANK", args.node_rank),
                                        ("MASTER_ADDR", args.master_addr)) if not value]
    if missing:
        raise ValueError(f"one launcher per node needs NNODES, NODE_RANK and MASTER_ADDR (node 0's address): "
                         f"{', '.join(missing)} not set")
    nodes = whole_number(args.nnodes, "NNODES", 1)
    rank = whole_number(args.node_rank, "NODE_RANK", 0)
    if rank >= nodes:
        raise ValueError(f"NODE_RANK={rank} is not below NNODES={nodes}")
    if not args.node_hostfile:
        raise ValueError("--node_hostfile: where to write the NNODES form's hostfile")
    Path(args.node_hostfile).write_text("".join(f"{NODE_LABEL.format(n)} slots={gpus}\n" for n in range(nodes)))
    words = ["deepspeed", "--hostfile", args.node_hostfile, "--no_ssh", "--node_rank", str(rank),
             "--master_addr", args.master_addr, *port]
    return words, nodes * gpus, f"NNODES={nodes} x NUM_GPUS={gpus} (this is node {rank})"


def check_dataset_layout(train_file: str, batch_method: str, world_size: int, sequence_parallel_size: int,
                         per_device_batch: int) -> str:
    """What was checked of the dataset's group_size against the world size (error on a mismatch)."""
    rows = rows_per_micro_step(world_size, per_device_batch, sequence_parallel_size)
    if batch_method == "naive":
        return "naive batches: no group size to check"
    stats_file = Path(train_file) / batch_method / "stats.json"
    if not stats_file.is_file():  # train.py stops on it, naming the file; nothing to compare here
        return (f"{stats_file} not found, group size not checked (train.py needs it): "
                f"`{sort_and_group_command(rows, train_file)}` builds groups for this world size")
    stats = read_layout_stats(stats_file)
    max_length = stats.get("max_length") if isinstance(stats.get("max_length"), int) else None
    try:
        per_group = check_data_parallel_layout(stats["group_size"], world_size, per_device_batch,
                                               sequence_parallel_size, train_file, max_length)
    except ValueError as err:
        raise ValueError(f"{stats_file}: {err}") from err
    split = "" if per_group == 1 else f", each group split over {per_group} consecutive micro-steps"
    return f"{stats_file}: group_size {stats['group_size']} fits {rows} rows per micro-step{split}"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train_file", required=True, help="the recipe's DATA (pre_tokenize.py output)")
    parser.add_argument("--batch_method", required=True,
                        help="naive (no group size to check), or sort / pack: <train_file>/<method>/stats.json")
    parser.add_argument("--sequence_parallel_size", type=int, default=1, help="SP: GPUs sharing each pack")
    parser.add_argument("--per_device_batch", type=int, default=1, help="train.py --per_device_train_batch_size")
    for name, meaning in (("num_gpus", "NUM_GPUS: GPUs per node"), ("hostfile", "HOSTFILE: DeepSpeed hostfile"),
                          ("nnodes", "NNODES: nodes, one launcher each"), ("node_rank", "NODE_RANK: this node, 0.."),
                          ("master_addr", "MASTER_ADDR: node 0's address"), ("master_port", "MASTER_PORT"),
                          ("node_hostfile", "where the NNODES form writes its hostfile")):
        parser.add_argument(f"--{name}", default="", help=meaning)
    return parser.parse_args(argv)


def main(argv=None) -> list[str]:
    args = parse_args(argv)
    try:
        words, world, counted = launch_plan(args)
        checked = check_dataset_layout(args.train_file, args.batch_method, world, args.sequence_parallel_size,
                                       args.per_device_batch)
    except (OSError, ValueError) as err:
        sys.exit(f"[launch] ERROR: {err}")
    print(f"[launch] world size {world}: {counted}", file=sys.stderr)
    print(f"[launch] {checked}", file=sys.stderr)
    print("\n".join(words))
    return words


if __name__ == "__main__":
    main()
