"""Audit specs: validation against a bundle (shared by the API and the CLI) and the chunk plan."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from service.attacks import ATTACKS
from service.errors import AttackInputError, BadInput, ConfigError, HashAuditError, UnknownName
from service.inference import BundleService

MAX_EPS_VALUES = 16
DEFAULT_CHUNK = 250
EXAMPLES = 3

# Ranges of every number an audit request carries (the API schema uses the same constants;
# values outside them are refused before anything is stored). Seeds feed numpy and torch
# generators, which take 0 .. 2**32 - 1 everywhere; counts stay far below what the store
# (JSON, 64-bit integers) can hold.
SEED_MAX = 2**32 - 1
COUNT_MAX = 10_000_000  # queries.count, top_k, backdoor.num_train, backdoor.poisons
CHUNK_MAX = 5000
BATCH_MAX = 1024
PATCH_MAX = 4096
EPOCHS_MAX = 1000
TRIGGER_STEPS_MAX = 100_000


def _int_in(value: Any, lo: int, hi: int, field: str, what: str = "an integer") -> int:
    """``value`` as an int in [lo, hi]; BadInput naming ``field`` otherwise (bools refused)."""
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:40] + "..."
        raise BadInput(f"{field}: {what} from {lo} to {hi}, got {shown}", field=field)
    return value


def normalize_spec(svc: BundleService, raw: dict[str, Any], *, max_queries: int,
                   upload: dict[str, Any] | None = None,
                   lookup: Any = None) -> dict[str, Any]:
    """Check a request against the bundle and return the full spec the tasks run.

    ``raw`` keys: methods (list), eps (value or list; '8/255' strings allowed), queries
    (``{"count", "seed"}`` or ``{"upload_id"}``), top_k (None = mAP@all), seed, chunk_size,
    batch_size. Errors name the offending field.
    """
    methods = raw.get("methods") or [svc.default_method]
    if isinstance(methods, str):
        methods = [methods]
    seen: list[str] = []
    for m in methods:
        try:
            name = svc.check_method(m)
        except UnknownName as exc:
            raise UnknownName(exc.message.replace("method:", "methods:", 1),
                              field="methods") from None
        if name not in seen:
            seen.append(name)
    eps_in = raw.get("eps", 8 / 255)
    eps_list = eps_in if isinstance(eps_in, list) else [eps_in]
    if not eps_list or len(eps_list) > MAX_EPS_VALUES:
        raise BadInput(f"eps: give 1 to {MAX_EPS_VALUES} values", field="eps")
    by_key = {round(v, 9): v for v in (svc.check_eps(e) for e in eps_list)}
    eps = [by_key[k] for k in sorted(by_key)]

    q = dict(raw.get("queries") or {})
    seed = _int_in(raw.get("seed", 0), 0, SEED_MAX, "seed")
    if upload is not None:
        total = int(upload["count"])
        count = total
        queries = {"source": "upload", "upload_id": upload["id"], "count": count,
                   "total": total}
    else:
        if q.get("upload_id"):
            raise BadInput("queries.upload_id: unknown upload", field="queries.upload_id")
        total = len(svc.bundle.queries)
        count = q.get("count")
        count = total if count is None else _int_in(count, 1, COUNT_MAX, "queries.count")
        if count < 1 or count > total:
            raise BadInput(f"queries.count: between 1 and {total} (the bundle's query split)",
                           field="queries.count")
        q_seed = seed if q.get("seed") is None else _int_in(q["seed"], 0, SEED_MAX,
                                                            "queries.seed")
        queries = {"source": "bundle", "count": count, "seed": q_seed, "total": total}
    if count > max_queries:
        raise BadInput(f"queries: at most {max_queries} per audit (HASHAUDIT_MAX_AUDIT_QUERIES)",
                       field="queries")
    top_k = raw.get("top_k")
    if top_k is not None:
        _int_in(top_k, 1, COUNT_MAX, "top_k", "null (mAP over the whole gallery) or an integer")
    chunk = raw.get("chunk_size") or DEFAULT_CHUNK
    _int_in(chunk, 1, CHUNK_MAX, "chunk_size")
    batch = raw.get("batch_size") or min(chunk, 100)
    _int_in(batch, 1, BATCH_MAX, "batch_size")
    for m in seen:
        if ATTACKS.get(m).targeted and len(svc.classes) < 2:
            raise AttackInputError(f"methods: {m} needs at least two classes", field="methods")
    transfer = []
    for name in raw.get("transfer_to") or []:
        if lookup is None:
            raise BadInput("transfer_to: not available here", field="transfer_to")
        if name == svc.bundle.manifest.name:
            raise BadInput(f"transfer_to: {name} is the audited model itself (its white-box "
                           "rows are in the report already)", field="transfer_to")
        try:
            other = lookup(name)
        except UnknownName as exc:
            raise UnknownName(exc.message, field="transfer_to") from None
        om, m0 = other.manifest, svc.bundle.manifest
        if om.class_names != m0.class_names or om.input != m0.input:
            raise BadInput(f"transfer_to: {name} has other classes or another input spec than "
                           f"{m0.name}", field="transfer_to")
        if all(t["model"] != name for t in transfer):
            transfer.append({"model": name, "sha": other.sha})
    m = svc.bundle.manifest
    return {
        "model": m.name, "bundle_version": m.version, "bundle_sha": svc.bundle.sha,
        "methods": seen, "eps": eps, "queries": queries,
        "top_k": None if top_k is None else int(top_k), "seed": seed,
        "chunk_size": chunk, "batch_size": batch, "examples": EXAMPLES,
        "transfer_to": transfer,
    }


BACKDOOR_DEFAULT_POISONS = (10, 20, 40, 80)
BACKDOOR_DEFAULT_TRIGGER_STEPS = 300
MAX_POISON_LEVELS = 8


def _opt_int(raw: dict[str, Any], key: str, lo: int, hi: int, field: str) -> int | None:
    v = raw.get(key)
    return None if v is None else _int_in(v, lo, hi, field)


def normalize_backdoor_spec(svc: BundleService, raw: dict[str, Any]) -> dict[str, Any]:
    """Check a backdoor audit request (``raw["backdoor"]``) against the bundle.

    The audit poisons ``poisons`` target-class training images for each count asked (0, the
    clean baseline, is always added), retrains the bundle's recipe on each poisoned set, and
    measures clean mAP and triggered t-MAP. Errors name the field (``backdoor.<key>``).
    """
    from service.parsing import label_vector

    b = dict(raw.get("backdoor") or {})
    seed = _int_in(raw.get("seed", 0), 0, SEED_MAX, "seed")
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
        raise BadInput("backdoor.save_bundles: true or false", field="backdoor.save_bundles")
    return {
        "type": "backdoor", "model": m.name, "bundle_version": m.version,
        "bundle_sha": bundle.sha, "seed": seed,
        "backdoor": {"target": target, "target_name": svc.classes[target], "poisons": poisons,
                     "patch": patch, "num_train": num_train, "train_images": int(len(train)),
                     "target_train_images": n_target,
                     "epochs": epochs if epochs is not None else int(recipe.get("epochs", 0)),
                     "perturb_eps": perturb_eps,
                     "trigger_steps": (steps if steps is not None
                                       else BACKDOOR_DEFAULT_TRIGGER_STEPS),
                     "save_bundles": save},
    }


def is_backdoor(spec: dict[str, Any]) -> bool:
    return spec.get("type") == "backdoor"


def n_query_chunks(spec: dict[str, Any]) -> int:
    return math.ceil(spec["queries"]["count"] / spec["chunk_size"])


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


def chunk_keys(spec: dict[str, Any]) -> list[str]:
    """``method|eps_index|chunk_index`` for every unit of work (an attack audit), or
    ``backdoor|trigger`` then ``backdoor|p<N>`` per poison count (a backdoor audit)."""
    if is_backdoor(spec):
        return [TRIGGER_CHUNK] + [poison_chunk(n) for n in spec["backdoor"]["poisons"]]
    n = n_query_chunks(spec)
    return [f"{m}|{e}|{c}" for m in spec["methods"] for e in range(len(spec["eps"]))
            for c in range(n)]


def parse_chunk(key: str) -> tuple[str, int, int]:
    method, e, c = key.split("|")
    return method, int(e), int(c)


def query_positions(spec: dict[str, Any]) -> np.ndarray:
    """Positions of the audited queries in the bundle's query split (or the upload)."""
    q = spec["queries"]
    if q["count"] >= q["total"]:
        return np.arange(q["total"])
    rng = np.random.default_rng(q["seed"])
    return np.sort(rng.choice(q["total"], q["count"], replace=False))


def target_labels(labels: np.ndarray, seed: int) -> np.ndarray:
    """One target class per query, seeded, never one of the query's own labels."""
    rng = np.random.default_rng(seed + 7919)
    out = np.zeros_like(labels)
    for i, row in enumerate(labels):
        choices = np.flatnonzero(row == 0)
        if len(choices) == 0:
            choices = np.arange(labels.shape[1])
        out[i, rng.choice(choices)] = 1
    return out
