"""ResourceClaims for borrowers of `peer-hbm.spillway.dev` (what a user or the operator creates).

`borrower_claim` asks for `memory` bytes of one lender device, optionally only an NVLink peer
of the borrower's own GPU (same `nvlinkDomain` attribute: the scheduler then picks a lender
the borrower reaches over NVLink) or one named lender GPU (its `uuid` attribute). The CEL
selectors are evaluated by kube-scheduler against the attributes in the ResourceSlices.
`claim_request` is one such request; a claim may hold several (the operator's claim for a
replica with more than one lender).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from spillway.dra import CAPACITY, DEVICE_CLASS, DRIVER

REQUEST = "peer-hbm"


def _cel_string(value: str) -> str:
    return json.dumps(value)  # a JSON string literal is a valid CEL string literal


def claim_request(memory: int | str, *, name: str = REQUEST, nvlink_domain: str = "", lender_uuid: str = "",
                  not_uuid: str = "") -> dict[str, Any]:
    """One device request for `memory` of a lender GPU: in `nvlink_domain` (and not `not_uuid`,
    the borrower's own GPU, which shares its domain), and/or the GPU `lender_uuid` (the
    selectors are ANDed)."""
    exactly: dict[str, Any] = {"deviceClassName": DEVICE_CLASS,
                               "capacity": {"requests": {CAPACITY: str(memory)}}}
    attr = f'device.attributes["{DRIVER}"]'
    selectors = []
    if nvlink_domain:
        selectors.append({"cel": {"expression": f"{attr}.nvlinkDomain == {_cel_string(nvlink_domain)}"}})
    if not_uuid:
        selectors.append({"cel": {"expression": f"{attr}.uuid != {_cel_string(not_uuid)}"}})
    if lender_uuid:
        selectors.append({"cel": {"expression": f"{attr}.uuid == {_cel_string(lender_uuid)}"}})
    if selectors:
        exactly["selectors"] = selectors
    return {"name": name, "exactly": exactly}


def borrower_claim(namespace: str, name: str, memory: int | str = 0, *, nvlink_domain: str = "",
                   lender_uuid: str = "", labels: Mapping[str, str] | None = None,
                   requests: Sequence[Mapping[str, Any]] = ()) -> dict[str, Any]:
    """A ResourceClaim for `memory` (bytes or a quantity) of one lender GPU, or for `requests`
    (from `claim_request`) when given."""
    reqs = [dict(r) for r in requests] or [claim_request(memory, nvlink_domain=nvlink_domain,
                                                         lender_uuid=lender_uuid)]
    meta: dict[str, Any] = {"name": name, "namespace": namespace}
    if labels:
        meta["labels"] = dict(labels)
    return {"apiVersion": "resource.k8s.io/v1", "kind": "ResourceClaim", "metadata": meta,
            "spec": {"devices": {"requests": reqs}}}
