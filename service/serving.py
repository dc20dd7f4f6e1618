"""The serving pipeline without HTTP: attack, hash, search and build the answer for decoded
uploads (:mod:`service.images` decodes them).

The API (``service.api``) calls it from its micro-batcher; ``benchmarks/service.py`` calls it
in-process with the same batching to measure what HTTP costs. Nothing here knows about
FastAPI.
"""

from __future__ import annotations

import base64
import logging
import math
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from service.attacks import ATTACKS
from service.attacks.factory import attack_for_bundle, bundle_context
from service.attacks.generator_attack import GeneratorAttack
from service.attacks.runner import attack_batch
from service.attacks.universal import PatternAttack
from service.errors import (
    AttackInputError,
    UnknownName,
)
from service.images import encode_png, perturbation_stats, stretch_perturbation
from service.nets.hasher import encode_uint8
from service.parsing import eps_value, label_vector
from service.retrieval.codes import codes_to_hex, pack_bits
from service.retrieval.ranking import topk
from service.store.bundle import Bundle

log = logging.getLogger(__name__)

DEFAULT_EPS = 8 / 255
FALLBACK_MAX_EPS = 0.1  # bundles without a trained generator
# The default /attack method of a bundle whose manifest declares none (extra.default_method).
# PGD needs no labels and no trained generator, so it runs on every bundle, and on the shipped
# bundle it changes the code of 30 of the first 30 test images at 8/255 in about 0.1 s on one
# CPU thread, where its generators change 16-18 (benchmarks/default_method.py).
RULE_DEFAULT_METHOD = "pgd"
# Methods a "nothing changed" note suggests, strongest first on the shipped bundle
# (README, attack table); targeted methods get targeted suggestions.
STRONGER_UNTARGETED = ("dhta", "pgd")
STRONGER_TARGETED = ("tha_targeted", "dhta_targeted")


def code_json(code: np.ndarray) -> dict[str, str]:
    """A +-1 code as hex (first bit = most significant) and as a '0'/'1' string (+1 -> '1')."""
    bits = np.where(np.asarray(code) > 0, 49, 48).astype(np.uint8).tobytes().decode("ascii")
    return {"hex": codes_to_hex(code), "bits": bits}


def _eps_text(eps: float) -> str:
    """eps as grey levels of 255 (``16/255``, ``25.5/255``)."""
    v = eps * 255
    return f"{v:.0f}/255" if abs(v - round(v)) < 1e-6 else f"{v:.1f}/255"


def _needs_labels(method: str) -> bool:
    cls = ATTACKS.get(method)
    return bool(cls.needs_labels or cls.needs_context)


# ----------------------------------------------------------------------------- queries


@dataclass
class Query:
    """One decoded request for the pipeline.

    Attributes:
        image: uint8 (C, H, W) at the bundle's input size.
        labels: multi-hot uint8 (C,) or None (encode without labels).
        target: multi-hot target labels for targeted methods, else None.
        top_k: number of gallery hits to return.
        preprocess: what decoding did (from :func:`service.images.decode_upload`).
    """

    image: np.ndarray
    labels: np.ndarray | None = None
    target: np.ndarray | None = None
    top_k: int = 10
    preprocess: dict[str, Any] = field(default_factory=dict)
    received_at: float = field(default_factory=time.perf_counter)


ATTACK_CACHE = 16  # attacks a BundleService keeps built, least recently used dropped


class BundleService:
    """A loaded bundle ready to serve: method/eps checks, batched attack + search, thumbnails.

    Calls that run models (:meth:`attack`, :meth:`encode`, :meth:`warmup`) must come from
    one thread at a time (the API's inference thread).
    """

    def __init__(self, bundle: Bundle, seed: int = 0, thumb_cache: int = 2048) -> None:
        self.bundle = bundle
        self.seed = seed
        m = bundle.manifest
        self.classes = m.class_names
        self.bits = m.bits
        self.input = m.input
        self.transform = bundle.transform
        self.generators = sorted({g["attack"] for g in m.generators})
        self.max_eps = max((g["eps"] for g in m.generators), default=FALLBACK_MAX_EPS)
        self._methods = [n for n in ATTACKS.names() if ATTACKS.get(n).available(m)]
        self.default_method, self.default_method_source = self._pick_default(m.extra)
        self._id_to_index = {int(i): n for n, i in enumerate(bundle.gallery.ids)}
        self._db_packed = np.ascontiguousarray(bundle.gallery.codes_packed)
        self._db_labels = bundle.gallery.labels.astype(np.float32)
        self._thumbs: OrderedDict[int, bytes] = OrderedDict()
        self._thumb_cache = thumb_cache
        self._thumb_lock = threading.Lock()
        self._proto_cache: dict[bytes, np.ndarray] = {}
        # attacks built for (method, eps), kept for the next batch (a few: eps is the client's)
        self._attacks: OrderedDict[tuple[str, float], Any] = OrderedDict()
        # per-bundle parts of every answer, built once instead of per request
        self._model = {"name": m.name, "version": m.version, "sha": bundle.sha}
        self._hit_labels: dict[int, list[str]] = {}  # gallery index -> label names

    @property
    def name(self) -> str:
        return self.bundle.name

    # ---- checks (cheap; called on the event loop before a request is queued)

    def methods(self) -> list[str]:
        """Registered attacks this bundle can run (generator attacks only if trained in)."""
        return list(self._methods)

    def _pick_default(self, extra: dict[str, Any]) -> tuple[str, str]:
        """The method /attack and audits run when none is named, and why.

        A bundle may declare it in its manifest (``extra.default_method``, e.g. a generator
        measured to be strong enough); otherwise :data:`RULE_DEFAULT_METHOD`. A declared name
        this bundle cannot run, or a targeted one (a request without a target could not run
        it), is ignored with a warning.
        """
        declared = extra.get("default_method")
        if declared:
            if declared in self._methods and not ATTACKS.get(declared).targeted:
                return str(declared), "manifest"
            log.warning("bundle %s declares default_method %r, which is not an untargeted "
                        "method it can run; using %s", self.bundle.name, declared,
                        RULE_DEFAULT_METHOD)
        return RULE_DEFAULT_METHOD, "rule"

    @property
    def label_free_method(self) -> str:
        """The default when a request gives no labels: the bundle's default method if it
        needs none, else its trained ``uaa_gan``, else ``pgd``."""
        if not _needs_labels(self.default_method):
            return self.default_method
        return "uaa_gan" if "uaa_gan" in self.generators else RULE_DEFAULT_METHOD

    def check_method(self, method: str | None, has_labels: bool = True) -> str:
        if not method and not has_labels:
            return self.label_free_method
        method = method or self.default_method
        names = self._methods
        if method not in names:
            extra = ""
            if method in ATTACKS.names():
                extra = f" ({method} is registered but bundle {self.name} has no generator for it)"
            raise UnknownName(f"method: unknown method {method!r}{extra}; this bundle offers: "
                              f"{', '.join(names)}", field="method")
        return method

    def check_eps(self, eps: str | float | None) -> float:
        value = DEFAULT_EPS if eps in (None, "") else eps_value(eps, "eps")
        if value > self.max_eps + 1e-9:
            raise AttackInputError(
                f"eps: {value:.4f} exceeds this bundle's maximum {self.max_eps:.4f} "
                f"({self.max_eps * 255:.1f}/255)", field="eps")
        return value

    def labels_for(self, values: Any, field: str = "labels") -> np.ndarray:
        return label_vector(values, self.classes, field)

    def check_attack_inputs(self, method: str, labels: np.ndarray | None,
                            target: np.ndarray | None) -> None:
        cls = ATTACKS.get(method, field="method")
        if labels is None and (cls.needs_labels or cls.needs_context):
            raise AttackInputError(f"labels: {method} needs the query's labels (class indices "
                                   "or names)", field="labels")
        if cls.targeted and target is None:
            raise AttackInputError(f"target: {method} is targeted; give a target label",
                                   field="target")
        if not cls.targeted and target is not None:
            raise AttackInputError(f"target: {method} is untargeted; leave target empty",
                                   field="target")

    # ---- models (inference thread)

    def _prototype_codes(self, labels: np.ndarray) -> tuple[np.ndarray, str]:
        ctx = bundle_context(self.bundle)
        out = []
        for row in labels:
            key = row.tobytes()
            if key not in self._proto_cache:
                t = torch.from_numpy(row[None].astype(np.float32)).to(self.bundle.device)
                self._proto_cache[key] = ctx.prototype_codes(t)[0].cpu().numpy().astype(np.int8)
            out.append(self._proto_cache[key])
        source = "prototype_net" if ctx.prototype is not None else "database_vote"
        return np.stack(out), source

    def _hits(self, codes: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return topk(pack_bits(codes), self._db_packed, k)

    def _hit_rows(self, idx: np.ndarray, dist: np.ndarray, labels: np.ndarray | None,
                  target: np.ndarray | None) -> tuple[list[dict[str, Any]], float | None]:
        g = self.bundle.gallery
        rows, rel_count = [], 0
        names = self._hit_labels
        for i, d in zip(idx.tolist(), dist.tolist(), strict=True):
            gid = int(g.ids[i])
            hit_labels = g.labels[i]
            hit_names = names.get(i)
            if hit_names is None:
                hit_names = names[i] = [self.classes[j] for j in np.flatnonzero(hit_labels)]
            row: dict[str, Any] = {
                "id": gid, "labels": list(hit_names),
                "hamming": int(d), "thumbnail_url": f"/gallery/{self.name}/{gid}.png"}
            if labels is not None:
                rel = bool((hit_labels & labels).any())
                rel_count += rel
                row["relevant"] = rel
            if target is not None:
                row["matches_target"] = bool((hit_labels & target).any())
            rows.append(row)
        prec = rel_count / len(rows) if labels is not None and rows else None
        return rows, prec

    def _names(self, vec: np.ndarray | None) -> list[str] | None:
        return None if vec is None else [self.classes[j] for j in np.flatnonzero(vec)]

    def _model_json(self) -> dict[str, str]:
        return dict(self._model)

    def encode(self, queries: list[Query]) -> list[dict[str, Any]]:
        """Code and top-k hits of each query (no attack)."""
        t0 = time.perf_counter()
        images = np.stack([q.image for q in queries])
        codes = encode_uint8(self.bundle.hasher, images)
        t1 = time.perf_counter()
        k = max(q.top_k for q in queries)
        idx, dist = self._hits(codes, k)
        t2 = time.perf_counter()
        out = []
        for n, q in enumerate(queries):
            hits, prec = self._hit_rows(idx[n, :q.top_k], dist[n, :q.top_k], q.labels, None)
            out.append({
                "model": self._model_json(), "labels": self._names(q.labels),
                "preprocess": q.preprocess, "code": code_json(codes[n]), "bits": self.bits,
                "top_k": q.top_k, "hits": hits, "precision_at_k": prec,
                "batch_size": len(queries),
                "timings_ms": {"hash": (t1 - t0) * 1e3, "search": (t2 - t1) * 1e3},
            })
        return out

    def _attack(self, method: str, eps: float) -> Any:
        """The attack for ``method`` at ``eps``, built on first use; the last
        ``ATTACK_CACHE`` built are kept (generators move to their memory format once)."""
        key = (method, eps)
        atk = self._attacks.pop(key, None)
        if atk is None:
            atk = attack_for_bundle(self.bundle, method, eps, seed=self.seed)
        self._attacks[key] = atk
        while len(self._attacks) > ATTACK_CACHE:
            self._attacks.popitem(last=False)
        return atk

    def attack(self, method: str, eps: float, queries: list[Query]) -> list[dict[str, Any]]:
        """Attack, re-hash, search before/after and build one answer per query."""
        images = np.stack([q.image for q in queries])
        # methods that need labels were checked before queueing; label-free ones may mix
        labels = (np.stack([q.labels for q in queries])
                  if all(q.labels is not None for q in queries) else None)
        targeted = ATTACKS.get(method).targeted
        target = np.stack([q.target for q in queries]) if targeted else None
        t0 = time.perf_counter()
        res = attack_batch(self.bundle, method, eps, images, labels, target, seed=self.seed,
                           attack=self._attack(method, eps))
        t1 = time.perf_counter()
        k = max(q.top_k for q in queries)
        both = np.concatenate([res.clean_codes, res.adv_codes])
        idx, dist = self._hits(both, k)
        with_labels = [q.labels for q in queries if q.labels is not None]
        protos, source = (self._prototype_codes(np.stack(with_labels)) if with_labels
                          else (None, None))
        proto_of = {}
        j = 0
        for n, q in enumerate(queries):
            if q.labels is not None:
                proto_of[n] = protos[j]
                j += 1
        tprotos = self._prototype_codes(target)[0] if target is not None else None
        t2 = time.perf_counter()
        b = len(queries)
        out = []
        for n, q in enumerate(queries):
            clean_c, adv_c = res.clean_codes[n], res.adv_codes[n]
            hits_c, prec_c = self._hit_rows(idx[n, :q.top_k], dist[n, :q.top_k], q.labels,
                                            q.target)
            hits_a, prec_a = self._hit_rows(idx[b + n, :q.top_k], dist[b + n, :q.top_k],
                                            q.labels, q.target)
            p_code = proto_of.get(n)
            hamming = {
                "clean_vs_adversarial": int(res.hamming[n]),
                "clean_vs_prototype": None if p_code is None else int((clean_c != p_code).sum()),
                "adversarial_vs_prototype": (None if p_code is None
                                             else int((adv_c != p_code).sum())),
                "prototype_source": None if p_code is None else source,
            }
            if tprotos is not None:
                hamming["adversarial_vs_target_prototype"] = int((adv_c != tprotos[n]).sum())
            changed = bool(res.hamming[n] > 0)
            hits_changed = [h["id"] for h in hits_c] != [h["id"] for h in hits_a]
            pert_png, pert_scale = stretch_perturbation(q.image, res.adversarial[n])
            out.append({
                "model": self._model_json(), "method": method, "eps": eps,
                "eps_levels": math.floor(eps * 255 + 1e-6), "seed": self.seed,
                "labels": self._names(q.labels), "target": self._names(q.target),
                "preprocess": q.preprocess,
                "changed": changed, "hits_changed": hits_changed,
                "note": self._note(method, eps, changed, hits_changed, int(res.hamming[n]),
                                   q),
                "adversarial_png": base64.b64encode(encode_png(res.adversarial[n])).decode(),
                "perturbation_png": base64.b64encode(encode_png(pert_png)).decode(),
                "codes": {"clean": code_json(clean_c), "adversarial": code_json(adv_c)},
                "bits": self.bits, "hamming": hamming, "top_k": q.top_k,
                "hits": {"clean": hits_c, "adversarial": hits_a},
                "precision_at_k": {"clean": prec_c, "adversarial": prec_a},
                "perturbation": {**perturbation_stats(q.image, res.adversarial[n]),
                                 "png_scale": pert_scale},
                "batch_size": b,
                "timings_ms": {"attack": res.seconds * 1e3,
                               "hash": (t1 - t0 - res.seconds) * 1e3,
                               "search": (t2 - t1) * 1e3},
            })
        return out

    def _note(self, method: str, eps: float, changed: bool, hits_changed: bool,
              moved: int, q: Query) -> str | None:
        """One line for an answer that shows no effect: it does not mean the model is robust;
        what to try instead (a stronger method, a larger eps). None when the hits changed."""
        if changed and hits_changed:
            return None
        levels = math.floor(eps * 255 + 1e-6)
        if not changed:
            what = (f"The adversarial code equals the clean code: {method} at eps "
                    f"{levels}/255 did not move this image, so the hits are the same.")
        else:
            what = (f"The code moved by {moved} bit{'s' if moved != 1 else ''}, but the "
                    f"top-{q.top_k} hits are the same.")
        pool = STRONGER_TARGETED if ATTACKS.get(method).targeted else STRONGER_UNTARGETED
        stronger = [m for m in pool if m != method and m in self._methods
                    and (q.labels is not None or not _needs_labels(m))]
        tries = [" or ".join(f"method={m}" for m in stronger)] if stronger else []
        if eps < self.max_eps - 1e-9:
            bigger = min(2 * eps, self.max_eps)
            tries.append(f"a larger eps (e.g. {_eps_text(bigger)}; this bundle allows up to "
                         f"{_eps_text(self.max_eps)})")
        if not tries:
            return (what + f" {method} is among the strongest methods here and eps is at "
                    "this bundle's maximum: this image's code is hard to move at this budget.")
        return what + " That alone does not show robustness: try " + ", or ".join(tries) + "."

    def warmup(self) -> None:
        """Run the default method and an encode once so the first request is not slow."""
        q = self.bundle.queries
        if len(q) == 0:
            return
        # a mid-grey image: serving must not need the data source of a bundle whose queries
        # are read through it
        image = np.full(self.transform.shape, 128, np.uint8)
        query = Query(image=image, labels=q.labels[0], top_k=1)
        self.encode([query])
        self.attack(self.default_method, min(DEFAULT_EPS, self.max_eps), [query])
        if self.label_free_method:
            self.attack(self.label_free_method, min(DEFAULT_EPS, self.max_eps),
                        [Query(image=image, top_k=1)])

    # ---- thumbnails (any thread)

    def thumbnail_png(self, item_id: int) -> bytes:
        idx = self._id_to_index.get(int(item_id))
        if idx is None:
            raise UnknownName(f"id: gallery of {self.name} has no item {item_id}", field="id")
        with self._thumb_lock:
            png = self._thumbs.get(idx)
            if png is not None:
                self._thumbs.move_to_end(idx)
                return png
        png = encode_png(self.bundle.gallery.thumbnails[idx])
        with self._thumb_lock:
            self._thumbs[idx] = png
            while len(self._thumbs) > self._thumb_cache:
                self._thumbs.popitem(last=False)
        return png

    def summary(self, detail: bool = False) -> dict[str, Any]:
        """Manifest summary for /models."""
        m = self.bundle.manifest
        ev = m.evaluation.get("figures", {})
        out: dict[str, Any] = {
            "name": m.name, "version": m.version, "sha": self.bundle.sha,
            "created_at": m.created_at, "bits": self.bits,
            "hasher": {k: m.hasher.get(k) for k in ("family", "arch", "bits")},
            "classes": self.classes, "input": self.input,
            "dataset": m.dataset.get("name"),
            "gallery_size": len(self.bundle.gallery), "query_size": len(self.bundle.queries),
            "default_method": self.default_method,
            "default_method_source": self.default_method_source,
            "label_free_method": self.label_free_method, "max_eps": self.max_eps,
            "attacks": [self._method_json(n) for n in self.methods()],
            "evaluation": {k: ev.get(k) for k in ("map_all", "map_1000", "p_r2",
                                                  "num_queries", "num_database")},
            "provenance": _provenance(m.extra.get("provenance"), detail),
        }
        if detail:
            out["evaluation"] = {"protocol": m.evaluation.get("protocol"), "figures": ev}
            out["dataset"] = {k: v for k, v in m.dataset.items() if k != "splits"}
            out["training"] = {"command": m.training.get("command")}
            out["package_version"] = m.package_version
        return out

    def _method_json(self, name: str) -> dict[str, Any]:
        cls = ATTACKS.get(name)
        row: dict[str, Any] = {
            "name": name, "targeted": cls.targeted, "needs_labels": cls.needs_labels,
            "kind": "iterative" if cls.iterative else (
                "generator" if issubclass(cls, GeneratorAttack) else "pattern"),
            "description": (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else "",
            "max_eps": self.max_eps,
        }
        if issubclass(cls, PatternAttack):
            row["trained_eps"] = list(self.bundle.manifest.extra["patterns"]["eps"])
        elif not cls.iterative:
            gens = [g for g in self.bundle.manifest.generators if g["attack"] == name]
            row["trained_eps"] = [g["eps"] for g in gens]
            row["eps_range"] = [g.get("training", {}).get("eps_range") for g in gens]
        return row


def _provenance(prov: Any, detail: bool) -> dict[str, Any] | None:
    """An imported bundle's origin for /models: the whole record with ``detail``, else the
    format, layout, first upstream source and the checkpoint's name and sha256."""
    if not isinstance(prov, dict):
        return None
    if detail:
        return prov
    ck = prov.get("checkpoint") or {}
    ups = prov.get("upstream") or [{}]
    return {"format": prov.get("format"), "layout": prov.get("layout"), "upstream": ups[0],
            "checkpoint": {"file": ck.get("file"), "sha256": ck.get("sha256")}}
