"""The backdoor audit (``"type": "backdoor"``): how few poisoned training images does the
bundle's training recipe tolerate?

Plan: ``backdoor|trigger`` (the trigger patch, optimised once on the bundle's hasher), then
``backdoor|p<N>`` per poison count (``p0``, the clean baseline, always included), each
depending on the trigger chunk: poison N target-class training images, retrain the recipe
from scratch, measure clean mAP and t-MAP with and without the trigger. The chunks retrain
hashers, so their code lives in the training package; this module names it
(``chunk_function``) and never imports it.
"""

from __future__ import annotations

import argparse
import html
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

import service
from service.errors import BadInput, ConfigError, HashAuditError
from service.jobs.audit_store import unpack_arrays
from service.jobs.audit_types.base import COUNT_MAX, SEED_MAX, AuditType, SpecInputs, int_in
from service.jobs.audit_types.html import (
    axes,
    b64png,
    finish,
    fmt,
    img,
    json_link,
    protocol_table,
    provenance,
    zoom,
)
from service.jobs.context import JobContext

BACKDOOR_DEFAULT_POISONS = (10, 20, 40, 80)
BACKDOOR_DEFAULT_TRIGGER_STEPS = 300
MAX_POISON_LEVELS = 8
PATCH_MAX = 4096
EPOCHS_MAX = 1000
TRIGGER_STEPS_MAX = 100_000

TRIGGER_CHUNK = "backdoor|trigger"


def poison_chunk(poisons: int) -> str:
    return f"backdoor|p{poisons}"


def parse_backdoor_chunk(key: str) -> int | None:
    """``N`` of ``backdoor|p<N>``, None for the trigger chunk."""
    if key == TRIGGER_CHUNK:
        return None
    stage = key.removeprefix("backdoor|")
    if stage == key or not stage.startswith("p") or not stage[1:].isdigit():
        raise ConfigError(f"unknown backdoor chunk {key!r}", field="chunk")
    return int(stage[1:])


class BackdoorSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # the unions are range-checked by BackdoorAudit.normalize, whose errors name the field
    target: int | str = Field(description="target class (index 0 .. classes - 1, or name)")
    poisons: int | list[int] = Field(
        list(BACKDOOR_DEFAULT_POISONS), description="poisoned training images (0 .. the "
        "target class's training images); one count or several (a model is retrained per "
        "count; 0, the clean baseline, is always added)")
    patch: int | None = Field(None, ge=1, le=PATCH_MAX, description="trigger side in pixels "
                              "(default 10% of the width, at least 3)")
    num_train: int | None = Field(None, ge=10, le=COUNT_MAX, description="seeded subset of "
                                  "the bundle's train split (default: all of it)")
    epochs: int | None = Field(None, ge=1, le=EPOCHS_MAX,
                               description="training epochs (default: the bundle's recipe)")
    perturb_eps: float | str = Field("8/255", description="L-inf budget of the confusing "
                                     "perturbations")
    trigger_steps: int | None = Field(None, ge=1, le=TRIGGER_STEPS_MAX,
                                      description="trigger optimisation steps (default 300)")
    save_bundles: bool = Field(True, description="freeze each poisoned hasher as a bundle "
                               "(GET /audit/{id}/bundles/{name} downloads it)")


def _opt_int(raw: dict[str, Any], key: str, lo: int, hi: int, field: str) -> int | None:
    v = raw.get(key)
    return None if v is None else int_in(v, lo, hi, field)


class BackdoorAudit(AuditType):
    name = "backdoor"
    title = "Backdoor audit"
    summary = "clean-label poisoning of its training set, retrained on the workers"
    chunk_function = "service.training.backdoor_audit:compute_chunk"
    request_fields = {
        "backdoor": (BackdoorSpec | None, Field(None, description="backdoor audits only")),
    }
    example = {"model": "fmnist-dpsh-32", "type": "backdoor",
               "backdoor": {"target": "Bag", "poisons": [40, 80], "epochs": 8}}
    chunk_progress = True
    timeout_setting = "train_timeout"
    cli_action = "backdoor"
    cli_help = ("a backdoor audit here: poison, retrain per poison count, t-MAP with the "
                "trigger")
    cli_out = "backdoor_out"

    # ---- spec and plan

    def normalize(self, raw: dict[str, Any], inputs: SpecInputs) -> dict[str, Any]:
        """Check ``raw["backdoor"]`` against the bundle: the audit poisons ``poisons``
        target-class training images for each count asked (0, the clean baseline, is always
        added), retrains the bundle's recipe on each poisoned set, and measures clean mAP and
        triggered t-MAP. Errors name the field (``backdoor.<key>``)."""
        from service.parsing import label_vector

        if raw.get("backdoor") is None:
            raise BadInput("backdoor: the backdoor settings (at least target) are required",
                           field="backdoor")
        svc = inputs.svc
        b = dict(raw["backdoor"])
        seed = int_in(raw.get("seed", 0), 0, SEED_MAX, "seed")
        bundle = svc.bundle
        m = bundle.manifest
        if "target" not in b or b["target"] in (None, ""):
            raise BadInput("backdoor.target: the target class (index or name) is required",
                           field="backdoor.target")
        vec = label_vector(str(b["target"]), svc.classes, "backdoor.target")
        if int(vec.sum()) != 1:
            raise BadInput("backdoor.target: exactly one class", field="backdoor.target")
        target = int(vec.argmax())
        try:
            recipe = m.training["config"]["hasher"]
        except (KeyError, TypeError):
            raise BadInput(f"model: {m.name} records no hasher recipe to retrain",
                           field="model") from None
        num_train = _opt_int(b, "num_train", 10, COUNT_MAX, "backdoor.num_train")
        train = bundle.train_positions(num_train, seed)
        labels = bundle.gallery.labels[train]  # labels only: no image copies on the request path
        if len(train) == 0:
            raise BadInput(f"model: {m.name}'s gallery does not hold its train split",
                           field="model")
        n_target = int(labels[:, target].sum())
        poisons_in = b.get("poisons")
        if poisons_in is None:
            poisons_in = list(BACKDOOR_DEFAULT_POISONS)
        poisons_in = poisons_in if isinstance(poisons_in, list) else [poisons_in]
        if not poisons_in or len(poisons_in) > MAX_POISON_LEVELS:
            raise BadInput(f"backdoor.poisons: 1 to {MAX_POISON_LEVELS} counts",
                           field="backdoor.poisons")
        for v in poisons_in:
            if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= n_target:
                raise BadInput(f"backdoor.poisons: counts from 0 to {n_target} (the training "
                               f"images of {svc.classes[target]!r})", field="backdoor.poisons")
        poisons = sorted({0, *poisons_in})
        inp = m.input
        patch = _opt_int(b, "patch", 1, min(inp["height"], inp["width"]) - 1, "backdoor.patch")
        epochs = _opt_int(b, "epochs", 1, EPOCHS_MAX, "backdoor.epochs")
        steps = _opt_int(b, "trigger_steps", 1, TRIGGER_STEPS_MAX, "backdoor.trigger_steps")
        pe = b.get("perturb_eps", 8 / 255)
        try:
            perturb_eps = svc.check_eps(pe)
        except HashAuditError as exc:
            raise BadInput(exc.message.replace("eps", "backdoor.perturb_eps", 1),
                           field="backdoor.perturb_eps") from None
        save = b.get("save_bundles", True)
        if not isinstance(save, bool):
            raise BadInput("backdoor.save_bundles: true or false",
                           field="backdoor.save_bundles")
        return {
            "type": "backdoor", "model": m.name, "bundle_version": m.version,
            "bundle_sha": bundle.sha, "seed": seed,
            "backdoor": {"target": target, "target_name": svc.classes[target],
                         "poisons": poisons, "patch": patch, "num_train": num_train,
                         "train_images": int(len(train)), "target_train_images": n_target,
                         "epochs": epochs if epochs is not None else int(recipe.get("epochs", 0)),
                         "perturb_eps": perturb_eps,
                         "trigger_steps": (steps if steps is not None
                                           else BACKDOOR_DEFAULT_TRIGGER_STEPS),
                         "save_bundles": save},
        }

    def chunk_keys(self, spec: dict[str, Any]) -> list[str]:
        """``backdoor|trigger``, then ``backdoor|p<N>`` per poison count."""
        return [TRIGGER_CHUNK] + [poison_chunk(n) for n in spec["backdoor"]["poisons"]]

    def depends_on(self, spec: dict[str, Any], chunk: str) -> list[str]:
        """Every model is measured with the one stored trigger."""
        return [] if chunk == TRIGGER_CHUNK else [TRIGGER_CHUNK]

    # ---- progress

    def progress(self, spec: dict[str, Any], done: list[str],
                 inside: dict[str, dict[str, Any]]) -> dict[str, Any]:
        """Per stage: queued / running (with its epoch) / done; epochs trained in all."""
        epochs = spec["backdoor"]["epochs"]
        stages, done_epochs = {}, 0
        for c in self.chunk_keys(spec):
            st = {"state": "done" if c in done else ("running" if c in inside else "queued")}
            if c in inside and c not in done:
                st.update(inside[c])
            if c != TRIGGER_CHUNK:
                done_epochs += epochs if c in done else int(inside.get(c, {}).get("epoch", 0))
            stages[c.split("|", 1)[1]] = st
        n_models = len(spec["backdoor"]["poisons"])
        return {"done_epochs": done_epochs, "total_epochs": n_models * epochs,
                "stages": stages}

    def progress_text(self, progress: dict[str, Any]) -> str:
        return f"{progress['done_epochs']} / {progress['total_epochs']} training epochs done"

    # ---- reduce

    def reduce(self, ctx: JobContext, audit_id: str, spec: dict[str, Any],
               chunks: dict[str, bytes]) -> dict[str, Any]:
        """Trigger and poison chunks -> the t-MAP vs poisons table, with p0 as the baseline."""
        b = spec["backdoor"]
        trig, tmeta = unpack_arrays(chunks[TRIGGER_CHUNK])
        parts = {n: unpack_arrays(chunks[poison_chunk(n)]) for n in b["poisons"]}
        base = parts[0][1]["figures"]
        rows = []
        for n in b["poisons"]:
            meta = parts[n][1]
            f = meta["figures"]
            rows.append({
                "poisons": n, **f,
                "clean_map_change": f["clean_map"] - base["clean_map"],
                "t_map_gain": f["t_map_triggered"] - base["t_map_triggered"],
                "train_seconds": meta["timings"]["train_s"], "timings": meta["timings"],
                "bundle": meta["bundle"]})
        examples = []
        for n in b["poisons"]:
            arr = parts[n][0]
            if n > 0 and "example_poisoned" in arr:
                examples = [{"original_png": b64png(o), "poisoned_png": b64png(p)}
                            for o, p in zip(arr["example_original"], arr["example_poisoned"],
                                            strict=True)]
                break
        bundle = ctx.models.get(spec["model"])
        m = bundle.manifest
        return {
            "type": "backdoor", "audit_id": audit_id, "model": spec["model"],
            "bundle_version": spec["bundle_version"], "bundle_sha": spec["bundle_sha"],
            "package_version": service.__version__, "seed": spec["seed"],
            "target": b["target"], "target_name": b["target_name"],
            "classes": m.class_names, "bits": m.bits,
            "patch_side": tmeta["side"], "perturb_eps": b["perturb_eps"],
            "epochs": b["epochs"], "train_images": b["train_images"],
            "target_train_images": b["target_train_images"],
            "queries": int(len(bundle.queries)),
            "protocol": {"clean_map": "mAP@all of every query on the model's own re-encoded "
                                      "gallery",
                         "t_map": "mAP@all of the non-target queries, relevance = the target "
                                  "label, with the trigger pasted bottom-right"},
            "surrogate": tmeta["surrogate"], "trigger_seconds": tmeta["seconds"],
            "trigger_png": b64png(trig["trigger"]),
            "triggered_examples": [b64png(x) for x in trig["example_triggered"]],
            "baseline": rows[0], "rows": rows, "examples": examples,
        }

    def frozen_bundles(self, result: dict[str, Any]) -> list[dict[str, Any]]:
        """The poisoned hashers frozen under the artifact folder (one per count > 0)."""
        return [r["bundle"] for r in result.get("rows", []) if r.get("bundle")]

    # ---- report

    def report_body(self, audit_id: str, result: dict[str, Any], json_href: str) -> str:
        """Trigger, t-MAP vs poisons table and plot, poisoned examples, frozen bundles."""
        r = result
        parts = [json_link(json_href), provenance(
            audit_id, r, f"target <b>{html.escape(r['target_name'])}</b> · trigger "
            f"{r['patch_side']} px bottom-right · confusing perturbations "
            f"{r['perturb_eps'] * 255:.0f}/255 · retrained {r['epochs']} epochs on "
            f"{r['train_images']} images ({r['target_train_images']} of the target class) · "
            f"{r['queries']} queries")]
        sur = r["surrogate"]
        parts.append("<h2>Trigger</h2><p class='strip'>"
                     + zoom(r["trigger_png"], "trigger") + " on queries: "
                     + "".join(zoom(x, "triggered query") for x in r["triggered_examples"])
                     + "</p><p class='meta'>On the surrogate (the bundle's own hasher) the "
                     f"trigger alone gives t-MAP {fmt(sur['t_map_triggered'])} (no trigger "
                     f"{fmt(sur['t_map_untriggered'])}).</p>")
        parts.append("<h2>t-MAP vs poisoned images</h2><table><tr><th>poisons</th>"
                     "<th>clean mAP</th><th>change vs clean model</th><th>t-MAP triggered</th>"
                     "<th>gain vs clean model</th><th>t-MAP no trigger</th><th>train s</th>"
                     "<th class='l'>poisoned bundle</th></tr>")
        for row in r["rows"]:
            b = row.get("bundle")
            link = (f"<a href='/audit/{audit_id}/bundles/{html.escape(b['name'])}'>"
                    f"{html.escape(b['name'])}</a>" if b else
                    ("clean baseline" if row["poisons"] == 0 else "-"))
            parts.append(
                f"<tr><td>{row['poisons']}</td><td>{fmt(row['clean_map'])}</td>"
                f"<td>{fmt(row['clean_map_change'], '+.4f')}</td>"
                f"<td>{fmt(row['t_map_triggered'])}</td>"
                f"<td>{fmt(row['t_map_gain'], '+.4f')}</td>"
                f"<td>{fmt(row['t_map_untriggered'])}</td>"
                f"<td>{fmt(row['train_seconds'], '.0f')}</td><td class='l'>{link}</td></tr>")
        parts.append("</table>")
        parts.append("<div class='plots'>" + img(backdoor_plot(r), "t-MAP vs poisons")
                     + "</div>")
        if r["examples"]:
            parts.append("<h2>Poisoned training images</h2><p class='meta'>original · poisoned "
                         "(confusing perturbation + trigger; label unchanged)</p>"
                         "<p class='strip'>"
                         + " ".join(zoom(e["original_png"], "original")
                                    + zoom(e["poisoned_png"], "poisoned")
                                    for e in r["examples"])
                         + "</p>")
        parts.append(protocol_table(r["protocol"]))
        return "".join(parts)

    # ---- the command line

    def add_cli_options(self, parser: argparse.ArgumentParser) -> None:
        b = parser
        b.add_argument("--target", required=True, help="target class (index or name)")
        b.add_argument("--poisons", type=int, nargs="+", default=list(BACKDOOR_DEFAULT_POISONS),
                       help="poisoned training images per model (0, the baseline, is added)")
        b.add_argument("--patch", type=int, default=None,
                       help="trigger side in pixels (default: 10%% of the width, at least 3)")
        b.add_argument("--num-train", type=int, default=None,
                       help="seeded subset of the bundle's train split (default: all)")
        b.add_argument("--epochs", type=int, default=None, help="default: the bundle's recipe")
        b.add_argument("--perturb-eps", default="8/255",
                       help="eps of the perturbation added to the poisoned images")
        b.add_argument("--trigger-steps", type=int, default=BACKDOOR_DEFAULT_TRIGGER_STEPS,
                       help="optimisation steps of the trigger")
        b.add_argument("--seed", type=int, default=0, help="poisoning and training seed")
        b.add_argument("--no-save", action="store_true", help="do not freeze poisoned bundles")
        b.add_argument("--artifacts", type=Path, default=None,
                       help="where poisoned bundles go (default: $HASHAUDIT_ARTIFACT_DIR)")

    def cli_request(self, args: argparse.Namespace) -> dict[str, Any]:
        return {"type": "backdoor", "seed": args.seed, "backdoor": {
            "target": args.target, "poisons": args.poisons, "patch": args.patch,
            "num_train": args.num_train, "epochs": args.epochs,
            "perturb_eps": args.perturb_eps, "trigger_steps": args.trigger_steps,
            "save_bundles": not args.no_save}}

    def cli_total(self, spec: dict[str, Any]) -> tuple[int, str]:
        b = spec["backdoor"]
        return len(b["poisons"]) * b["epochs"], "epoch"

    def cli_summary(self, result: dict[str, Any]) -> list[str]:
        r = result
        lines = [f"target {r['target_name']}, trigger {r['patch_side']} px, "
                 f"{r['train_images']} training images, {r['epochs']} epochs"]
        for row in r["rows"]:
            where = f"  -> {row['bundle']['path']}" if row["bundle"] else ""
            lines.append(f"  poisons {row['poisons']:>5}: clean mAP {row['clean_map']:.4f}  "
                         f"t-MAP triggered {row['t_map_triggered']:.4f} (no trigger "
                         f"{row['t_map_untriggered']:.4f}){where}")
        return lines


def backdoor_plot(r: dict[str, Any]) -> str:
    """t-MAP (with and without the trigger) and clean mAP against the poison count."""
    rows = r["rows"]
    xs = [row["poisons"] for row in rows]
    fig, ax = axes()
    ax.plot(xs, [row["t_map_triggered"] for row in rows], "o-", label="t-MAP, triggered")
    ax.plot(xs, [row["t_map_untriggered"] for row in rows], "s:", label="t-MAP, no trigger")
    ax.plot(xs, [row["clean_map"] for row in rows], "^-", color="grey", label="clean mAP")
    ax.axhline(r["baseline"]["t_map_triggered"], color="k", ls="--", lw=1,
               label="t-MAP triggered, clean model")
    return finish(fig, ax, "poisoned training images", "mAP",
                  f"Backdoor toward {r['target_name']!r}")
