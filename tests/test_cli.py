"""The hashaudit command: train hasher / train bundle / eval, through main(argv)."""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO, TINY_ARGS, needs_fmnist
from service.cli import COMMANDS, main
from service.store import load_bundle


def test_eval_reproduces_the_recorded_figures_exactly(tiny_store: Path, tmp_path: Path,
                                                      capsys) -> None:
    out = tmp_path / "eval.json"
    assert main(["eval", "tiny", "--store", str(tiny_store), "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["reproduced"] is True and res["gallery_codes_match"] is True
    for k in ("map_all", "map_1000", "p_r2"):
        assert res["figures"][k] == res["recorded"][k]
    assert "reproduced" in capsys.readouterr().out


def test_tiny_bundle_beats_chance(tiny_store: Path) -> None:
    f = load_bundle(tiny_store / "tiny").manifest.evaluation["figures"]
    # 10 balanced classes: a random ranking scores about 0.1.
    assert f["map_all"] > 0.3


def test_eval_flags_a_changed_record(tiny_bundle_copy: Path, capsys) -> None:
    from service.store.bundle import finalize
    from service.store.manifest import Manifest

    m = Manifest.from_json((tiny_bundle_copy / "manifest.json").read_text())
    figs = dict(m.evaluation["figures"], map_all=m.evaluation["figures"]["map_all"] + 0.01)
    m = m.replace(evaluation={**m.evaluation, "figures": figs})
    finalize(tiny_bundle_copy, m, [f["path"] for f in m.files])
    assert main(["eval", str(tiny_bundle_copy)]) == 1
    assert "NOT reproduced" in capsys.readouterr().out


def test_train_bundle_from_a_config_file(tmp_path: Path) -> None:
    needs_fmnist()
    cfg = tmp_path / "b.toml"
    cfg.write_text(
        'name = "cfgb"\nversion = "3"\n[data]\nkind = "fashion_mnist_mosaic"\n'
        "num_train_items = 300\nnum_test_items = 60\nnum_query = 40\nnum_database = 300\n"
        'num_train = 200\nseed = 1\n[hasher]\narch = "small_cnn"\narch_kwargs = {width = 8}\n'
        'bits = 8\nloss = "hashnet"\nepochs = 1\nbatch_size = 50\n'
    )
    store = tmp_path / "store"
    assert main(["train", "bundle", "--config", str(cfg), "--store", str(store),
                 "--device", "cpu", "--no-progress"]) == 0
    b = load_bundle(store / "cfgb")
    assert b.manifest.version == "3" and b.manifest.hasher["family"] == "hashnet"
    assert b.gallery.labels.sum(1).max() > 1  # mosaics are multi-label
    assert b.manifest.training["config"]["data"]["kind"] == "fashion_mnist_mosaic"


def test_missing_data_says_how_to_get_it(tmp_path: Path, capsys) -> None:
    args = [a for a in TINY_ARGS]
    args[args.index("tiny")] = "nodata"
    rc = main(["train", *args, "--store", str(tmp_path),
               "--data-option", f'root="{tmp_path / "nothing"}"'])
    assert rc == 2
    assert "apt-get install -y dataset-fashion-mnist" in capsys.readouterr().out


def test_bad_config_file_is_named(tmp_path: Path, capsys) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text("name = \n")
    assert main(["train", "bundle", "--config", str(cfg)]) == 2
    assert "bad.toml" in capsys.readouterr().out


def test_shipped_config_parses() -> None:
    from service.training.bundle_builder import read_config
    from service.training.hasher import HasherConfig

    cfg = read_config(REPO / "configs" / "default_bundle.toml")
    HasherConfig.from_dict(cfg["hasher"])


# ----------------------------------------------------------------------------- help, usage


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """The subparsers of ``parser`` by name (empty when it has none)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def leaf_parsers() -> dict[str, argparse.ArgumentParser]:
    """Every parser a user reaches: ``eval``, ..., ``train hasher``, ``audit run``, ..."""
    from service import cli
    from service.training.train_cli import build_parser

    tops = {"train": build_parser(), "eval": cli.eval_parser(), "bundles": cli.bundles_parser(),
            "attack": cli.attack_parser(), "serve": cli.serve_parser(),
            "worker": cli.worker_parser(), "audit": cli.audit_parser(),
            "data": cli.data_parser(), "import": cli.import_parser(),
            "index": cli.index_parser()}
    assert set(tops) == set(COMMANDS)
    out = {}
    for name, parser in tops.items():
        subs = subcommands(parser)
        out.update({f"{name} {sub}": p for sub, p in subs.items()} if subs else {name: parser})
    return out


def run_cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "service.cli", *argv], capture_output=True,
                          text=True, timeout=120, cwd=REPO)


@pytest.mark.parametrize("argv", [["--help"], []])
def test_help_lists_every_command_on_one_line(argv, capsys) -> None:
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: hashaudit [-h] [--version] COMMAND [ARGS...]")
    table = {m.group(1): m.group(2) for m in
             re.finditer(r"^  ([a-z]+(?: [a-z]+)?) {2,}(\S.*)$", out, flags=re.M)}
    assert set(table) == set(leaf_parsers()), sorted(table)
    assert "train generator" in table and "train backdoor" in table and "audit run" in table


def test_version_prints_the_package_version() -> None:
    import tomllib

    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    r = run_cli("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"hashaudit {version}", r


def test_unknown_command_names_it_and_lists_the_valid_ones() -> None:
    r = run_cli("atack", "x.png")
    assert r.returncode == 2
    assert "unknown command 'atack'" in r.stderr
    assert all(name in r.stderr for name in COMMANDS), r.stderr
    r = run_cli("train", "hashr")
    assert r.returncode == 2 and "invalid choice: 'hashr'" in r.stderr
    assert all(name in r.stderr for name in ("hasher", "bundle", "generator", "backdoor"))


def option_blocks(help_text: str) -> dict[str, str]:
    """{'--eps': its help text, ...} from argparse's options section."""
    blocks: dict[str, str] = {}
    current = None
    for line in help_text.splitlines():
        m = re.match(r"^  (-[^ ].*?)(?: {2,}(.*))?$", line)
        if m:
            current = m.group(1)
            blocks[current] = m.group(2) or ""
        elif current and line.startswith("    "):
            blocks[current] += " " + line.strip()
        else:
            current = None
    return {inv.split(",")[-1].split()[0]: text for inv, text in blocks.items()}


def test_every_option_has_help_with_its_default() -> None:
    for name, parser in leaf_parsers().items():
        blocks = option_blocks(parser.format_help())
        for action in parser._actions:
            if not action.option_strings or isinstance(action, argparse._HelpAction):
                continue
            opt = action.option_strings[-1]
            text = blocks.get(opt, "")
            assert action.help, f"hashaudit {name} {opt}: no help"
            if action.nargs == 0:  # a flag: off unless given
                continue
            assert ("(required)" in text if action.required else "default" in text.lower()), \
                f"hashaudit {name} {opt}: help does not give its default: {text!r}"


def test_audit_run_defaults_to_the_api_method(tiny_store: Path, tiny_bundle,
                                              tmp_path: Path) -> None:
    """Without --methods, `audit run` audits what POST /audit would: the bundle's default
    method, then worst_case (the report's headline)."""
    from service.jobs.spec import normalize_spec
    from service.serving import BundleService

    svc = BundleService(tiny_bundle)
    api_default = normalize_spec(svc, {"queries": {"count": 4}}, max_queries=10)["methods"]
    out = tmp_path / "audit"
    assert main(["audit", "run", "--store", str(tiny_store), "--bundle", "tiny", "--count", "4",
                 "--device", "cpu", "--no-progress", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert [a["method"] for a in report["attacks"]] == api_default == [svc.default_method,
                                                                        "worst_case"]
