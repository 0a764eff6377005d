"""ResourceClaims for borrowers of `peer-hbm.spillway.dev` (what a user or the operator creates).

`borrower_claim` asks for `memory` bytes of one lender device, optionally only an NVLink peer
of the borrower's own GPU (same `nvlinkDomain` attribute: the scheduler then picks a lender
the borrower reaches over NVLink) or one named lender GPU (its `uuid` attribute). The CEL
selectors are evaluated by kube-scheduler against the attributes in the ResourceSlices.
"""

from __future__ import annotations

import json
from typing import Any

from spillway.dra import CAPACITY, DEVICE_CLASS, DRIVER

REQUEST = "peer-hbm"


def _cel_string(value: str) -> str:
    return json.dumps(value)  # a JSON string literal is a valid CEL string literal


def borrower_claim(namespace: str, name: str, memory: int | str, *, nvlink_domain: str = "",
                   lender_uuid: str = "", labels: dict[str, str] | None = None) -> dict[str, Any]:
    """A ResourceClaim for `memory` (bytes or a quantity) of one lender GPU."""
    exactly: dict[str, Any] = {"deviceClassName": DEVICE_CLASS,
                               "capacity": {"requests": {CAPACITY: str(memory)}}}
    selectors = []
    if nvlink_domain:
        selectors.append({"cel": {"expression": f'device.attributes["{DRIVER}"].nvlinkDomain == '
                                                f"{_cel_string(nvlink_domain)}"}})
    if lender_uuid:
        selectors.append({"cel": {"expression": f'device.attributes["{DRIVER}"].uuid == {_cel_string(lender_uuid)}'}})
    if selectors:
        exactly["selectors"] = selectors
    meta: dict[str, Any] = {"name": name, "namespace": namespace}
    if labels:
        meta["labels"] = dict(labels)
    return {"apiVersion": "resource.k8s.io/v1", "kind": "ResourceClaim", "metadata": meta,
            "spec": {"devices": {"requests": [{"name": REQUEST, "exactly": exactly}]}}}
