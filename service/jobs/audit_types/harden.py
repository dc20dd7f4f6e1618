"""The harden audit (``"type": "harden"``): adversarially fine-tune the bundle's hasher on a
worker, freeze the hardened hasher as a new bundle, and re-audit both models in one report.

Plan (three chunks; the chunk code lives in ``service.training.harden_audit``, named by
``chunk_function`` and never imported here):

* ``harden|train``: fine-tune a copy of the hasher with adversarial batches (ATRDH / CgAT:
  ``pgd_center``, ``pgd``, or one of the bundle's generators for cheap "fast" adversarial
  training), the recipe's hashing loss and CgAT's center term; freeze it under the artifact
  folder as a bundle flagged ``extra.hardened`` (parent sha, recipe, attack, eps); re-train
  its generators against the hardened hasher (option; default on when the bundle has
  untargeted ones).
* ``harden|original``: re-audit the original model: clean figures, every untargeted method
  it serves at every eps (PGD-20 is ``pgd``), PGD-100 with random restarts (worst restart per
  query) on a subset, and the PGD-20 adversarial queries kept for the transfer row. It does
  not depend on training, so a second worker runs it meanwhile.
* ``harden|hardened``: the same on the hardened bundle (same queries, same seed), plus the
  transfer row (the original's PGD-20 queries on the hardened model). Generator rows use the
  hardened bundle's re-trained generators, or, when they were not re-trained, the original's
  generators, labelled as such.
"""

from __future__ import annotations

import argparse
import html
import math
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

import service
from service.errors import BadInput, HashAuditError
from service.jobs.audit_store import unpack_arrays
from service.jobs.audit_types.base import COUNT_MAX, SEED_MAX, AuditType, SpecInputs, int_in
from service.jobs.audit_types.html import (
    axes,
    finish,
    fmt,
    img,
    json_link,
    protocol_table,
    provenance,
)
from service.jobs.context import JobContext

TRAIN_CHUNK = "harden|train"
ORIGINAL_CHUNK = "harden|original"
HARDENED_CHUNK = "harden|hardened"
PGD_ATTACKS = ("pgd_center", "pgd")
DEFAULT_AUDIT_EPS = ("4/255", "8/255", "16/255")
EPOCHS_MAX = 1000
STEPS_MAX = 1000
RESTARTS_MAX = 20
MAX_EPS_VALUES = 8
# Defaults from the sweep on the default bundle (README "Harden"): one epoch, a quarter of
# each batch adversarial, the recipe's learning rate / 20, CgAT's center term at weight 1.
DEFAULT_EPOCHS = 1
DEFAULT_STEPS = 5
DEFAULT_ADV_FRACTION = 0.25
DEFAULT_CENTER_WEIGHT = 1.0
CENTER_WEIGHT_MAX = 100.0
# epochs x training images: the total work a request may ask for (100 epochs of 50,000)
TRAIN_IMAGES_MAX = 5_000_000
DEFAULT_ROBUST_QUERIES = 250
DEFAULT_RESTARTS = 5
ROBUST_STEPS = 100
DEFAULT_GENERATOR_EPOCHS = 2
DEFAULT_GENERATOR_TRAIN = 5000
LR_MAX = 1.0


class HardenSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    attack: str = Field("pgd_center", description="training attack: pgd_center (CgAT), pgd, "
                        "or one of the bundle's untargeted generators (fast variant)")
    steps: int | None = Field(None, description=f"PGD steps per training batch (1 .. "
                              f"{STEPS_MAX}; default {DEFAULT_STEPS}; generators: unused)")
    eps: float | str = Field("8/255", description="training L-inf budget")
    epochs: int | None = Field(None, description=f"fine-tuning epochs (1 .. {EPOCHS_MAX}; "
                               f"default {DEFAULT_EPOCHS})")
    adv_fraction: float = Field(DEFAULT_ADV_FRACTION, description="share of each training "
                                "batch replaced by its adversarial version (0 .. 1)")
    lr: float | None = Field(None, description="fine-tuning learning rate (default: the "
                             "recipe's / 20), cosine to 0")
    center_weight: float = Field(DEFAULT_CENTER_WEIGHT, description="weight of CgAT's center "
                                 "term pulling adversarial codes to their label's center code "
                                 f"(0 .. {CENTER_WEIGHT_MAX:g}; 0 = off)")
    num_train: int | None = Field(None, description="seeded subset of the bundle's train "
                                  "split (default: all of it)")
    audit_eps: float | str | list[float | str] = Field(
        list(DEFAULT_AUDIT_EPS), description="eps values of the re-audit")
    queries: int | None = Field(None, description="re-audit a seeded sample of this many of the "
                                "bundle's queries (default: all)")
    robust_queries: int | None = Field(None, description="queries (the first of the sample) of "
                                       f"the PGD-100 x restarts row (default "
                                       f"{DEFAULT_ROBUST_QUERIES}, at most all); 0 = no such row")
    robust_eps: float | str | list[float | str] = Field(
        "8/255", description="eps values of the PGD-100 x restarts row (among audit_eps)")
    restarts: int = Field(DEFAULT_RESTARTS, description="random restarts of the PGD-100 row "
                          f"(1 .. {RESTARTS_MAX})")
    retrain_generators: bool | None = Field(
        None, description="re-train the bundle's untargeted generators against the hardened "
        "hasher (default: yes when it has any)")
    generator_epochs: int = Field(DEFAULT_GENERATOR_EPOCHS, description="epochs of each "
                                  "re-trained generator (1 .. 1000)")
    generator_num_train: int = Field(DEFAULT_GENERATOR_TRAIN, description="training images of "
                                     "each re-trained generator")


def _eps_list(svc: Any, value: Any, field: str) -> list[float]:
    values = value if isinstance(value, list) else [value]
    if not values or len(values) > MAX_EPS_VALUES:
        raise BadInput(f"{field}: 1 to {MAX_EPS_VALUES} values", field=field)
    out: dict[float, float] = {}
    for v in values:
        try:
            e = svc.check_eps(v)
        except HashAuditError as exc:
            raise BadInput(exc.message.replace("eps", field, 1), field=field) from None
        out[round(e, 9)] = e
    return [out[k] for k in sorted(out)]


def _float_in(value: Any, lo: float, hi: float, field: str, lo_open: bool = False) -> float:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value > hi or value < lo or (lo_open and value == lo):
        raise BadInput(f"{field}: a number {'above' if lo_open else 'from'} {lo} "
                       f"{'up to' if lo_open else 'to'} {hi}, got {value!r}"[:200], field=field)
    return float(value)


def _has_data(bundle: Any) -> bool:
    """Whether the hasher's training images can be read (its gallery holds the train split,
    or its data source is recorded)."""
    return len(bundle.train_positions()) > 0


def untargeted_methods(svc: Any) -> list[str]:
    from service.attacks import ATTACKS

    return [m for m in svc.methods() if not ATTACKS.get(m).targeted]


def generator_methods(svc: Any) -> list[str]:
    from service.attacks import ATTACKS
    from service.attacks.generator_attack import GeneratorAttack

    return [m for m in untargeted_methods(svc) if issubclass(ATTACKS.get(m), GeneratorAttack)]


class HardenAudit(AuditType):
    name = "harden"
    title = "Harden: adversarial fine-tuning and re-audit"
    summary = ("adversarial fine-tuning of the hasher on the workers, frozen as a new bundle, "
               "with both models re-audited")
    chunk_function = "service.training.harden_audit:compute_chunk"
    request_fields = {
        "harden": (HardenSpec | None, Field(None, description="harden audits only")),
    }
    example = {"model": "fmnist-dpsh-32", "type": "harden",
               "harden": {"attack": "pgd_center", "steps": 5, "eps": "8/255", "epochs": 3}}
    chunk_progress = True
    timeout_setting = "train_timeout"
    cli_action = "harden"
    cli_help = ("adversarial fine-tuning here: freeze the hardened bundle, re-audit both "
                "models")
    cli_out = "harden_out"

    # ---- spec and plan

    def normalize(self, raw: dict[str, Any], inputs: SpecInputs) -> dict[str, Any]:
        """Check ``raw["harden"]`` against the bundle; errors name the field
        (``harden.<key>``)."""
        from service.attacks import ATTACKS

        svc = inputs.svc
        bundle = svc.bundle
        m = bundle.manifest
        h = dict(raw.get("harden") or {})
        seed = int_in(raw.get("seed", 0), 0, SEED_MAX, "seed")
        gens = generator_methods(svc)
        attack = h.get("attack") or "pgd_center"
        if attack not in (*PGD_ATTACKS, *gens):
            known = ", ".join((*PGD_ATTACKS, *gens))
            extra = (" (a registered attack, but it cannot train: a targeted method, or a "
                     "generator this bundle lacks)" if attack in ATTACKS.names() else "")
            raise BadInput(f"harden.attack: unknown training attack {str(attack)[:40]!r}{extra};"
                           f" this bundle offers: {known}", field="harden.attack")
        steps = h.get("steps")
        steps = DEFAULT_STEPS if steps is None else int_in(steps, 1, STEPS_MAX, "harden.steps")
        eps = _eps_list(svc, h.get("eps", "8/255"), "harden.eps")
        if len(eps) != 1:
            raise BadInput("harden.eps: one value", field="harden.eps")
        epochs = h.get("epochs")
        epochs = DEFAULT_EPOCHS if epochs is None else int_in(epochs, 1, EPOCHS_MAX,
                                                               "harden.epochs")
        frac = _float_in(h.get("adv_fraction", DEFAULT_ADV_FRACTION), 0.0, 1.0,
                         "harden.adv_fraction", lo_open=True)
        lr = h.get("lr")
        lr = None if lr is None else _float_in(lr, 0.0, LR_MAX, "harden.lr", lo_open=True)
        center_w = _float_in(h.get("center_weight", DEFAULT_CENTER_WEIGHT), 0.0,
                             CENTER_WEIGHT_MAX, "harden.center_weight")
        try:
            recipe = m.training["config"]["hasher"]
        except (KeyError, TypeError):
            raise BadInput(f"model: {m.name} records no hasher recipe to fine-tune with",
                           field="model") from None
        if not _has_data(bundle):
            raise BadInput(f"model: {m.name} has no training data to fine-tune on (its gallery "
                           "does not hold its train split and no data source gives it)",
                           field="model")
        n_train = len(bundle.train_positions())
        num_train = h.get("num_train")
        if num_train is not None:
            num_train = int_in(num_train, 10, COUNT_MAX, "harden.num_train")
        train_images = min(num_train or n_train, n_train)
        if epochs * train_images > TRAIN_IMAGES_MAX:
            raise BadInput(f"harden.epochs: {epochs} epochs of {train_images} images is "
                           f"{epochs * train_images} training images; at most "
                           f"{TRAIN_IMAGES_MAX} per job (fewer epochs or harden.num_train)",
                           field="harden.epochs")
        audit_eps = _eps_list(svc, h.get("audit_eps", list(DEFAULT_AUDIT_EPS)),
                              "harden.audit_eps")
        total = len(bundle.queries)
        if total == 0:
            raise BadInput(f"model: {m.name} has no query split to re-audit with",
                           field="model")
        count = h.get("queries")
        count = total if count is None else int_in(count, 1, total, "harden.queries")
        if count > inputs.max_queries:
            raise BadInput(f"harden.queries: at most {inputs.max_queries} per audit "
                           "(HASHAUDIT_MAX_AUDIT_QUERIES)", field="harden.queries")
        robust_q = h.get("robust_queries")
        robust_q = (min(DEFAULT_ROBUST_QUERIES, count) if robust_q is None
                    else int_in(robust_q, 0, count, "harden.robust_queries"))
        robust_eps = _eps_list(svc, h.get("robust_eps", "8/255"), "harden.robust_eps")
        if any(all(abs(r - e) > 1e-9 for e in audit_eps) for r in robust_eps):
            raise BadInput("harden.robust_eps: values among harden.audit_eps",
                           field="harden.robust_eps")
        restarts = int_in(h.get("restarts", DEFAULT_RESTARTS), 1, RESTARTS_MAX,
                          "harden.restarts")
        retrain = h.get("retrain_generators")
        if retrain is not None and not isinstance(retrain, bool):
            raise BadInput("harden.retrain_generators: true or false",
                           field="harden.retrain_generators")
        retrain = bool(gens) if retrain is None else retrain
        if retrain and not gens:
            raise BadInput(f"harden.retrain_generators: {m.name} has no untargeted generator "
                           "to re-train", field="harden.retrain_generators")
        g_epochs = int_in(h.get("generator_epochs", DEFAULT_GENERATOR_EPOCHS), 1, EPOCHS_MAX,
                          "harden.generator_epochs")
        g_train = int_in(h.get("generator_num_train", DEFAULT_GENERATOR_TRAIN), 10, COUNT_MAX,
                         "harden.generator_num_train")
        methods = untargeted_methods(svc)
        return {
            "type": "harden", "model": m.name, "bundle_version": m.version,
            "bundle_sha": bundle.sha, "seed": seed,
            "harden": {
                "attack": attack, "steps": steps if attack in PGD_ATTACKS else None,
                "eps": eps[0], "epochs": epochs, "adv_fraction": frac, "lr": lr,
                "center_weight": center_w, "num_train": num_train,
                "train_images": train_images,
                "recipe_loss": recipe.get("loss"),
                "audit_eps": audit_eps, "methods": methods,
                "queries": {"count": count, "seed": seed, "total": total},
                "robust_queries": robust_q, "robust_eps": robust_eps if robust_q else [],
                "robust_steps": ROBUST_STEPS, "restarts": restarts,
                "retrain_generators": retrain,
                "generators": gens if retrain else [],
                "generator_epochs": g_epochs, "generator_num_train": g_train,
            },
        }

    def chunk_keys(self, spec: dict[str, Any]) -> list[str]:
        return [TRAIN_CHUNK, ORIGINAL_CHUNK, HARDENED_CHUNK]

    def depends_on(self, spec: dict[str, Any], chunk: str) -> list[str]:
        return [TRAIN_CHUNK, ORIGINAL_CHUNK] if chunk == HARDENED_CHUNK else []

    # ---- progress

    def progress(self, spec: dict[str, Any], done: list[str],
                 inside: dict[str, dict[str, Any]]) -> dict[str, Any]:
        """Per stage: queued / running (epoch, generator, rows) / done; epochs trained."""
        h = spec["harden"]
        stages = {}
        for c in self.chunk_keys(spec):
            st: dict[str, Any] = {"state": "done" if c in done else
                                  ("running" if c in inside else "queued")}
            if c in inside and c not in done:
                st.update(inside[c])
            stages[c.split("|", 1)[1]] = st
        epochs = h["epochs"]
        done_epochs = epochs if TRAIN_CHUNK in done else int(
            inside.get(TRAIN_CHUNK, {}).get("epoch", 0))
        return {"done_epochs": done_epochs, "total_epochs": epochs, "stages": stages}

    def progress_text(self, progress: dict[str, Any]) -> str:
        audits = sum(progress["stages"][s]["state"] == "done" for s in ("original", "hardened"))
        return (f"{progress['done_epochs']} / {progress['total_epochs']} fine-tuning epochs, "
                f"{audits} / 2 re-audits done")

    # ---- reduce

    def reduce(self, ctx: JobContext, audit_id: str, spec: dict[str, Any],
               chunks: dict[str, bytes]) -> dict[str, Any]:
        """The three chunks -> before/after figures, rows per method and eps, the verdict."""
        h = spec["harden"]
        _, train = unpack_arrays(chunks[TRAIN_CHUNK])
        _, orig = unpack_arrays(chunks[ORIGINAL_CHUNK])
        _, hard = unpack_arrays(chunks[HARDENED_CHUNK])
        rows = []
        for model, part in (("original", orig), ("hardened", hard)):
            for row in part["rows"]:
                rows.append({"model": model, **row})
        before, after = orig["clean"], hard["clean"]

        def find(model: str, method: str, eps: float) -> dict[str, Any] | None:
            return next((r for r in rows if r["model"] == model and r["method"] == method
                         and abs(r["eps"] - eps) < 1e-9), None)

        key_eps = min(h["audit_eps"], key=lambda e: abs(e - 8 / 255))
        p_before, p_after = find("original", "pgd", key_eps), find("hardened", "pgd", key_eps)
        summary = {
            "eps": key_eps,
            "pgd20_before": p_before["map_all"] if p_before else None,
            "pgd20_after": p_after["map_all"] if p_after else None,
            "clean_before": before["map_all"], "clean_after": after["map_all"],
            "train_seconds": train["timings"]["train_s"],
        }
        checks = gradient_masking_checks(rows, h)
        return {
            "type": "harden", "audit_id": audit_id, "model": spec["model"],
            "bundle_version": spec["bundle_version"], "bundle_sha": spec["bundle_sha"],
            "package_version": service.__version__, "seed": spec["seed"],
            "settings": h, "bundle": train["bundle"], "history": train["history"],
            "timings": {"train_s": train["timings"]["train_s"],
                        "generators_s": train["timings"].get("generators_s", 0.0),
                        "audit_original_s": orig["seconds"], "audit_hardened_s": hard["seconds"]},
            "generators": train["generators"],
            "clean": {"original": before, "hardened": after},
            "rows": rows, "summary": summary, "verdict": verdict(summary, h),
            "checks": checks,
            "queries": orig["queries"],
            "protocol": {
                "clean": "mAP@all, mAP@1000 and P@r<=2 of the audited queries, each model on "
                         "its own gallery codes (the hardened bundle's gallery is re-encoded)",
                "attacked": "the same figures with each query replaced by its adversarial "
                            "version, made on the model it is evaluated on (white-box), same "
                            "queries and seed for both models",
                "pgd": "PGD-20: 20 sign-gradient steps away from the clean code, step "
                       "2.5*eps/20, random start",
                "pgd100x5": f"PGD-{h['robust_steps']} with {h['restarts']} random restarts "
                            "(seeds differ); per query the restart with the lowest AP is "
                            f"kept; on the first {h['robust_queries']} audited queries",
                "transfer": "PGD-20 queries made on the original model, evaluated on the "
                            "hardened model (black-box)",
                "generators": "a generator attacks the hasher it was trained against; rows "
                              "marked 'original's generator' apply the original bundle's "
                              "generator to the hardened model (not re-trained)",
            },
        }

    def frozen_bundles(self, result: dict[str, Any]) -> list[dict[str, Any]]:
        return [result["bundle"]] if result.get("bundle") else []

    # ---- report

    def report_body(self, audit_id: str, result: dict[str, Any], json_href: str) -> str:
        return report_body(audit_id, result, json_href)

    # ---- the command line

    def add_cli_options(self, parser: argparse.ArgumentParser) -> None:
        b = parser
        b.add_argument("--attack", default="pgd_center", help="training attack: pgd_center, "
                       "pgd or one of the bundle's untargeted generators (default pgd_center)")
        b.add_argument("--steps", type=int, default=DEFAULT_STEPS,
                       help=f"PGD steps per training batch (default {DEFAULT_STEPS})")
        b.add_argument("--eps", default="8/255", help="training eps (default 8/255)")
        b.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS,
                       help=f"fine-tuning epochs (default {DEFAULT_EPOCHS})")
        b.add_argument("--adv-fraction", type=float, default=DEFAULT_ADV_FRACTION,
                       help=f"share of each batch made adversarial (default "
                            f"{DEFAULT_ADV_FRACTION})")
        b.add_argument("--lr", type=float, default=None,
                       help="learning rate (default: the recipe's / 20)")
        b.add_argument("--center-weight", type=float, default=DEFAULT_CENTER_WEIGHT,
                       help=f"weight of CgAT's center term, 0 = off (default "
                            f"{DEFAULT_CENTER_WEIGHT:g})")
        b.add_argument("--num-train", type=int, default=None,
                       help="seeded subset of the train split (default: all)")
        b.add_argument("--audit-eps", nargs="+", default=list(DEFAULT_AUDIT_EPS),
                       help="eps values of the re-audit (default 4/255 8/255 16/255)")
        b.add_argument("--queries", type=int, default=None,
                       help="re-audit a seeded sample of this many queries (default: all)")
        b.add_argument("--robust-queries", type=int, default=None,
                       help=f"queries of the PGD-100 x restarts row; 0 = none (default "
                            f"{DEFAULT_ROBUST_QUERIES})")
        b.add_argument("--robust-eps", nargs="+", default=["8/255"],
                       help="eps values of that row (default 8/255)")
        b.add_argument("--restarts", type=int, default=DEFAULT_RESTARTS,
                       help=f"random restarts of that row (default {DEFAULT_RESTARTS})")
        g = b.add_mutually_exclusive_group()
        g.add_argument("--retrain-generators", dest="retrain", action="store_const",
                       const=True, default=None, help="re-train the untargeted generators "
                       "against the hardened hasher (default when the bundle has any)")
        g.add_argument("--no-retrain-generators", dest="retrain", action="store_const",
                       const=False, help="keep them out of the hardened bundle")
        b.add_argument("--generator-epochs", type=int, default=DEFAULT_GENERATOR_EPOCHS,
                       help=f"epochs per re-trained generator (default "
                            f"{DEFAULT_GENERATOR_EPOCHS})")
        b.add_argument("--generator-num-train", type=int, default=DEFAULT_GENERATOR_TRAIN,
                       help=f"images per re-trained generator (default "
                            f"{DEFAULT_GENERATOR_TRAIN})")
        b.add_argument("--seed", type=int, default=0, help="training and audit seed")
        b.add_argument("--artifacts", type=Path, default=None,
                       help="where the hardened bundle goes (default: $HASHAUDIT_ARTIFACT_DIR)")

    def cli_request(self, args: argparse.Namespace) -> dict[str, Any]:
        return {"type": "harden", "seed": args.seed, "harden": {
            "attack": args.attack, "steps": args.steps, "eps": args.eps, "epochs": args.epochs,
            "adv_fraction": args.adv_fraction, "lr": args.lr,
            "center_weight": args.center_weight, "num_train": args.num_train,
            "audit_eps": args.audit_eps, "queries": args.queries,
            "robust_queries": args.robust_queries, "robust_eps": args.robust_eps,
            "restarts": args.restarts, "retrain_generators": args.retrain,
            "generator_epochs": args.generator_epochs,
            "generator_num_train": args.generator_num_train}}

    def cli_total(self, spec: dict[str, Any]) -> tuple[int, str]:
        return spec["harden"]["epochs"], "epoch"

    def cli_summary(self, result: dict[str, Any]) -> list[str]:
        r = result
        lines = [r["verdict"], f"hardened bundle -> {r['bundle']['path']}"]
        for row in r["rows"]:
            lines.append(f"  {row['model']:>8} {row['label']:<52} {row['eps'] * 255:4.0f}/255"
                         f"  mAP@all {row['map_all']:.4f}")
        for c in r["checks"]:
            lines.append(f"  check: {c['text']}")
        return lines


def verdict(s: dict[str, Any], h: dict[str, Any]) -> str:
    """The cost/benefit in one sentence."""
    e = f"{s['eps'] * 255:.0f}/255"
    how = (f"{h['epochs']} epoch{'s' if h['epochs'] != 1 else ''} of {h['attack']}"
           + (f"-{h['steps']}" if h.get("steps") else "")
           + f" adversarial fine-tuning at {h['eps'] * 255:.0f}/255")
    gain = ("" if s["pgd20_before"] is None else
            f" raises PGD-20 mAP@all at {e} from {s['pgd20_before']:.3f} to "
            f"{s['pgd20_after']:.3f}")
    secs = s["train_seconds"]
    took = f"{secs / 60:.1f} min" if secs >= 60 else f"{secs:.0f} s"
    return (f"{how} ({took} of training){gain}, while clean "
            f"mAP@all goes from {s['clean_before']:.3f} to {s['clean_after']:.3f} "
            f"({s['clean_after'] - s['clean_before']:+.3f}).")


def gradient_masking_checks(rows: list[dict[str, Any]], h: dict[str, Any]) -> list[dict[str, Any]]:
    """On the hardened model: PGD-100 x restarts within 0.03 mAP@all of PGD-20 or lower, and
    the transfer row not lower than the white-box rows (the usual signs of gradient masking)."""
    out = []
    hard = [r for r in rows if r["model"] == "hardened"]
    for eps in h["audit_eps"]:
        at = {r["method"]: r for r in hard if abs(r["eps"] - eps) < 1e-9}
        e = f"{eps * 255:.0f}/255"
        if "pgd100x5" in at and "pgd" in at:
            strong = at["pgd100x5"]["map_all"]
            p20 = at["pgd100x5"].get("pgd20_same_queries")
            p20 = at["pgd"]["map_all"] if p20 is None else p20
            ok = strong <= p20 + 0.03
            out.append({"check": "pgd100_vs_pgd20", "eps": eps, "ok": ok,
                        "text": f"at {e}, PGD-{h['robust_steps']}x{h['restarts']} mAP@all "
                                f"{strong:.4f} vs PGD-20 {p20:.4f} on the same queries "
                                f"({'consistent' if ok else 'PGD-20 overstates robustness'})"})
        if "transfer" in at:
            white = [r["map_all"] for m, r in at.items()  # rows on every audited query
                     if m not in ("transfer", "pgd100x5") and not r.get("borrowed_generator")]
            if white:
                ok = at["transfer"]["map_all"] >= min(white) - 1e-9
                what = "no sign of masking" if ok else "black-box beats white-box: masking?"
                out.append({"check": "transfer_vs_whitebox", "eps": eps, "ok": ok,
                            "text": f"at {e}, transfer mAP@all {at['transfer']['map_all']:.4f}"
                                    f" vs the strongest white-box row {min(white):.4f} "
                                    f"({what})"})
    return out


# ---- report


def robustness_plot(r: dict[str, Any]) -> str:
    """mAP@all vs eps, both models: PGD-20, the strongest white-box row per eps, transfer."""
    fig, ax = axes()
    eps = r["settings"]["audit_eps"]
    xs = [0.0] + [e * 255 for e in eps]
    for model, color in (("original", "tab:red"), ("hardened", "tab:blue")):
        clean = r["clean"][model]["map_all"]
        rows = [x for x in r["rows"] if x["model"] == model]

        def at(method: str, e: float, rows: list[dict[str, Any]] = rows) -> float | None:
            return next((x["map_all"] for x in rows if x["method"] == method
                         and abs(x["eps"] - e) < 1e-9), None)

        ax.plot(xs, [clean] + [at("pgd", e) for e in eps], "o-", color=color,
                label=f"{model}, PGD-20")
        worst = [min((x["map_all"] for x in rows if abs(x["eps"] - e) < 1e-9
                      and x["method"] not in ("transfer", "pgd100x5")
                      and not x.get("borrowed_generator")),
                     default=None) for e in eps]
        ax.plot(xs, [clean] + worst, "s:", color=color, label=f"{model}, strongest attack")
        if model == "hardened":
            tr = [at("transfer", e) for e in eps]
            if any(v is not None for v in tr):
                ax.plot(xs[1:], tr, "^--", color="grey", label="transfer original -> hardened")
    return finish(fig, ax, "eps (/255)", "mAP@all", "Robustness vs eps")


def report_body(audit_id: str, r: dict[str, Any], json_href: str) -> str:
    h = r["settings"]
    b = r["bundle"]
    t = r["timings"]
    parts = [f"<p class='verdict'>{html.escape(r['verdict'])}</p>", json_link(json_href),
             provenance(audit_id, r, f"training attack {html.escape(h['attack'])} at "
                        f"{h['eps'] * 255:.0f}/255 · {h['epochs']} epochs on "
                        f"{h['train_images']} images, {h['adv_fraction']:.0%} of each batch "
                        f"adversarial, center term weight {h.get('center_weight', 0.0):g} · "
                        f"{r['queries']['count']} queries")]
    link = (f"<a href='/audit/{audit_id}/bundles/{html.escape(b['name'])}'>"
            f"{html.escape(b['name'])}</a>")
    parts.append(f"<p>Hardened bundle: {link} (sha <code>{b['sha'][:16]}…</code>, parent "
                 f"<code>{r['bundle_sha'][:16]}…</code>). Training {t['train_s']:.0f} s, "
                 f"generator re-training {t['generators_s']:.0f} s, re-audits "
                 f"{t['audit_original_s']:.0f} s + {t['audit_hardened_s']:.0f} s.</p>")
    gens = r["generators"]
    if gens["retrained"]:
        parts.append("<p class='meta'>Generators re-trained against the hardened hasher ("
                     f"{gens['epochs']} epochs on {gens['num_train']} images each): "
                     f"{html.escape(', '.join(gens['names']))}. Their rows on the hardened "
                     "model use these.</p>")
        kept = [g for g, e in (gens.get("best_epochs") or {}).items() if e == 0]
        if kept:
            parts.append("<p class='meta'>No training epoch of "
                         f"{html.escape(', '.join(kept))} beat its starting point on the "
                         "validation split, so each kept its start: a residual generator "
                         "then equals its base universal pattern (same figures).</p>")
    elif gens["original"]:
        parts.append("<p class='meta'><b>Generators were not re-trained</b>: rows marked "
                     "“original's generator” apply the original bundle's generators (trained "
                     "against the original hasher) to the hardened model, a transfer attack, "
                     "not a white-box one; they are left out of the strongest-attack "
                     "figures.</p>")
    parts.append("<h2>Clean retrieval</h2><table><tr><th class='l'>model</th><th>mAP@all</th>"
                 "<th>mAP@1000</th><th>P@r≤2</th></tr>")
    for model in ("original", "hardened"):
        c = r["clean"][model]
        parts.append(f"<tr><td class='l'>{model}</td><td>{fmt(c['map_all'])}</td>"
                     f"<td>{fmt(c['map_1000'])}</td><td>{fmt(c['p_r2'])}</td></tr>")
    parts.append("</table>")
    parts.append("<h2>Attacked mAP@all, before and after</h2><table><tr><th class='l'>attack"
                 "</th>" + "".join(f"<th>{e * 255:.0f}/255 original</th><th>{e * 255:.0f}/255 "
                                   "hardened</th>" for e in h["audit_eps"]) + "</tr>")
    labels: dict[str, str] = {}
    for row in r["rows"]:
        labels.setdefault(row["method"], row["label"])
    for method, label in labels.items():
        cells = []
        for e in h["audit_eps"]:
            for model in ("original", "hardened"):
                row = next((x for x in r["rows"] if x["model"] == model and x["method"] == method
                            and abs(x["eps"] - e) < 1e-9), None)
                note = (" <span class='meta'>(original's generator)</span>"
                        if row and row.get("borrowed_generator") else "")
                cells.append(f"<td>{fmt(row['map_all']) if row else '-'}{note}</td>")
        parts.append(f"<tr><td class='l'>{html.escape(label)}</td>{''.join(cells)}</tr>")
    parts.append("</table>")
    parts.append("<div class='plots'>" + img(robustness_plot(r), "robustness vs eps",
                                             plot="robustness") + "</div>")
    if r["checks"]:
        parts.append("<h2>Gradient-masking checks (hardened model)</h2><ul>" + "".join(
            f"<li>{'✔' if c['ok'] else '✘'} {html.escape(c['text'])}</li>" for c in r["checks"])
            + "</ul>")
    parts.append("<h2>Fine-tuning</h2><table><tr><th>epoch</th><th>loss</th><th>bits flipped "
                 "by the training attack</th><th>seconds</th></tr>")
    for e in r["history"]:
        parts.append(f"<tr><td>{e['epoch']}</td><td>{fmt(e.get('loss'))}</td>"
                     f"<td>{fmt(e.get('bits_flipped'), '.3f')}</td>"
                     f"<td>{fmt(e['seconds'], '.0f')}</td></tr>")
    parts.append("</table>")
    parts.append(protocol_table(r["protocol"]))
    return "".join(parts)
