"""The kubelet-facing side: plugin registration and the DRA service (v1), on unix sockets.

The kubelet's plugin watcher finds our registration socket in its plugins_registry
directory (`<driver>-reg.sock`), calls `GetInfo` (type DRAPlugin, the driver name, the DRA
socket, the services we offer: "v1.DRAPlugin") and reports the outcome with
`NotifyRegistrationStatus`; then it calls NodePrepareResources / NodeUnprepareResources on
the DRA socket (`<plugins dir>/<driver>/dra.sock`). When either socket file disappears (a
kubelet restart can wipe the directories) both servers start again on new sockets, which the
watcher finds again; `_stamp` (inode, change time) tells a recreated file from ours.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from pathlib import Path

import grpc

from spillway.api.dra.v1 import api_pb2, api_pb2_grpc
from spillway.api.pluginregistration.v1 import api_pb2 as reg_pb2
from spillway.api.pluginregistration.v1 import api_pb2_grpc as reg_pb2_grpc
from spillway.deviceplugin.server import _stamp
from spillway.dra import DRIVER
from spillway.dra.prepare import Preparer

log = logging.getLogger(__name__)

PLUGIN_TYPE = "DRAPlugin"                  # k8s.io/kubelet/pkg/apis/pluginregistration/v1 DRAPlugin
DRA_SERVICE = "v1.DRAPlugin"               # k8s.io/kubelet/pkg/apis/dra/v1 DRAPluginService
DEFAULT_REGISTRY_DIR = Path("/var/lib/kubelet/plugins_registry")
DEFAULT_PLUGINS_DIR = Path("/var/lib/kubelet/plugins")
MAX_CLAIMS = 1024                          # per call; the kubelet sends the claims of one pod


class DRAService(api_pb2_grpc.DRAPluginServicer):
    def __init__(self, preparer: Preparer) -> None:
        self.preparer = preparer

    async def NodePrepareResources(self, request: api_pb2.NodePrepareResourcesRequest,
                                   context: grpc.aio.ServicerContext) -> api_pb2.NodePrepareResourcesResponse:
        if len(request.claims) > MAX_CLAIMS:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"{len(request.claims)} claims in one call; at most {MAX_CLAIMS}")
        resp = api_pb2.NodePrepareResourcesResponse()
        for claim in request.claims:
            resp.claims[claim.uid].CopyFrom(await self.preparer.prepare(claim))
        return resp

    async def NodeUnprepareResources(self, request: api_pb2.NodeUnprepareResourcesRequest,
                                     context: grpc.aio.ServicerContext) -> api_pb2.NodeUnprepareResourcesResponse:
        if len(request.claims) > MAX_CLAIMS:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"{len(request.claims)} claims in one call; at most {MAX_CLAIMS}")
        resp = api_pb2.NodeUnprepareResourcesResponse()
        for claim in request.claims:
            resp.claims[claim.uid].CopyFrom(await self.preparer.unprepare(claim))
        return resp


class RegistrationService(reg_pb2_grpc.RegistrationServicer):
    def __init__(self, endpoint: Path) -> None:
        self.endpoint = endpoint
        self.registered = False
        self.error = ""

    async def GetInfo(self, request: reg_pb2.InfoRequest, context: grpc.aio.ServicerContext) -> reg_pb2.PluginInfo:
        return reg_pb2.PluginInfo(type=PLUGIN_TYPE, name=DRIVER, endpoint=str(self.endpoint),
                                  supported_versions=[DRA_SERVICE])

    async def NotifyRegistrationStatus(self, request: reg_pb2.RegistrationStatus,
                                       context: grpc.aio.ServicerContext) -> reg_pb2.RegistrationStatusResponse:
        self.registered = request.plugin_registered
        self.error = request.error
        if request.plugin_registered:
            log.info("registered with the kubelet", extra={"driver": DRIVER, "endpoint": str(self.endpoint)})
        else:
            log.error("the kubelet refused the registration", extra={"driver": DRIVER, "error": request.error})
        return reg_pb2.RegistrationStatusResponse()


class KubeletPluginServer:
    """Serves both sockets; serves them anew when a socket file goes. `run` never returns."""

    def __init__(self, preparer: Preparer, *, registry_dir: Path = DEFAULT_REGISTRY_DIR,
                 plugins_dir: Path = DEFAULT_PLUGINS_DIR, poll_s: float = 0.5) -> None:
        self.dra_socket = Path(plugins_dir) / DRIVER / "dra.sock"
        self.reg_socket = Path(registry_dir) / f"{DRIVER}-reg.sock"
        self.dra = DRAService(preparer)
        self.registration = RegistrationService(self.dra_socket)
        self.poll_s = poll_s
        self._server: grpc.aio.Server | None = None
        self._stamps: tuple[tuple[int, int] | None, ...] = ()

    @property
    def registered(self) -> bool:
        return self.registration.registered

    async def _start(self) -> None:
        await self._stop()
        server = grpc.aio.server()
        api_pb2_grpc.add_DRAPluginServicer_to_server(self.dra, server)
        reg_pb2_grpc.add_RegistrationServicer_to_server(self.registration, server)
        # The DRA socket first: the kubelet connects to it as soon as it sees the registration.
        for path in (self.dra_socket, self.reg_socket):
            path.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            server.add_insecure_port(f"unix://{path}")
        await server.start()
        self._server = server
        self.registration.registered = False
        self._stamps = (_stamp(self.dra_socket), _stamp(self.reg_socket))
        log.info("serving the kubelet DRA plugin API", extra={"dra_socket": str(self.dra_socket),
                                                              "registration_socket": str(self.reg_socket)})

    async def _stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            await server.stop(grace=0.5)

    async def run(self) -> None:
        try:
            while True:
                if self._server is None or (_stamp(self.dra_socket), _stamp(self.reg_socket)) != self._stamps:
                    if self._server is not None:
                        log.info("a plugin socket was removed (kubelet restart?): serving anew")
                    await self._start()
                await asyncio.sleep(self.poll_s)
        finally:
            await self._stop()
            for path, stamp in zip((self.dra_socket, self.reg_socket), self._stamps, strict=False):
                with contextlib.suppress(OSError):
                    if _stamp(path) == stamp:
                        os.unlink(path)
