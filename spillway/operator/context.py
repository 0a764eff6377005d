"""What one reconcile of one tenant carries from the kopf handler to the pod: the tenant object
(the Events are posted on it), its parsed spec, and the function that posts Events."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from spillway.operator.model import TenantSpec
from spillway.operator.pods import TenantRef

# (object, type "Normal"/"Warning", reason, message): posts a Kubernetes Event on the object.
EventFn = Callable[[Mapping[str, Any], str, str, str], None]


def no_events(body: Mapping[str, Any], type_: str, reason: str, message: str) -> None:
    """An EventFn that posts nothing."""


@dataclass(frozen=True)
class TenantContext:
    """One tenant as one reconcile (or agent event) sees it."""

    body: Mapping[str, Any]
    spec: TenantSpec
    event: EventFn = no_events

    @property
    def ref(self) -> TenantRef:
        return TenantRef(self.spec.name, self.spec.namespace, self.spec.uid)

    @property
    def key(self) -> str:
        return self.spec.key

    def normal(self, reason: str, message: str) -> None:
        self.event(self.body, "Normal", reason, message)

    def warning(self, reason: str, message: str) -> None:
        self.event(self.body, "Warning", reason, message)
