"""The kubelet-facing side: the DevicePlugin gRPC service on our socket in the kubelet's
device-plugins directory, registration with the kubelet, and re-registration when the kubelet
restarts.

A restarting kubelet wipes the device-plugins directory (our socket goes) and serves a new
`kubelet.sock`. `PluginServer.run` polls both files (inode and change time, every
`poll_s`): when our socket is gone it restarts the gRPC server on a new socket, and when
`kubelet.sock` is new it registers again. Polling a directory entry is cheap, works on every
filesystem and in every container runtime, and reacts within `poll_s`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path

import grpc

from spillway.api.deviceplugin.v1beta1 import api_pb2, api_pb2_grpc
from spillway.deviceplugin import KUBELET_API_VERSION, KUBELET_SOCKET, RESOURCE_NAME, SOCKET_NAME
from spillway.deviceplugin.allocator import AllocationError, Allocator
from spillway.deviceplugin.metrics import Metrics
from spillway.deviceplugin.resources import ResourceManager

log = logging.getLogger(__name__)

OPTIONS = api_pb2.DevicePluginOptions(pre_start_required=False, get_preferred_allocation_available=True)


class DevicePluginService(api_pb2_grpc.DevicePluginServicer):
    def __init__(self, resources: ResourceManager, allocator: Allocator) -> None:
        self.resources = resources
        self.allocator = allocator

    async def GetDevicePluginOptions(self, request: api_pb2.Empty, context: grpc.aio.ServicerContext
                                     ) -> api_pb2.DevicePluginOptions:
        return OPTIONS

    async def ListAndWatch(self, request: api_pb2.Empty, context: grpc.aio.ServicerContext
                           ) -> AsyncIterator[api_pb2.ListAndWatchResponse]:
        seen = -1
        while True:
            version = self.resources.version
            if version == seen:
                version = await self.resources.wait_changed(seen)
            seen = version
            units = self.resources.units
            yield api_pb2.ListAndWatchResponse(devices=[api_pb2.Device(ID=u.id, health=u.health) for u in units])

    async def GetPreferredAllocation(self, request: api_pb2.PreferredAllocationRequest,
                                     context: grpc.aio.ServicerContext) -> api_pb2.PreferredAllocationResponse:
        resp = api_pb2.PreferredAllocationResponse()
        for req in request.container_requests:
            ids = await self.allocator.preferred(list(req.available_deviceIDs), list(req.must_include_deviceIDs),
                                                 int(req.allocation_size))
            resp.container_responses.append(api_pb2.ContainerPreferredAllocationResponse(deviceIDs=ids))
        return resp

    async def Allocate(self, request: api_pb2.AllocateRequest, context: grpc.aio.ServicerContext
                       ) -> api_pb2.AllocateResponse:
        resp = api_pb2.AllocateResponse()
        for req in request.container_requests:
            try:
                resp.container_responses.append(await self.allocator.allocate(list(req.devices_ids)))
            except AllocationError as exc:
                await context.abort(exc.code, exc.message)
        return resp

    async def PreStartContainer(self, request: api_pb2.PreStartContainerRequest, context: grpc.aio.ServicerContext
                                ) -> api_pb2.PreStartContainerResponse:
        return api_pb2.PreStartContainerResponse()


def _stamp(path: Path) -> tuple[int, int] | None:
    """Identity of a directory entry: a recreated file has a new inode or change time."""
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_ino, st.st_ctime_ns)


class PluginServer:
    """Serves the DevicePlugin service and keeps it registered with the kubelet."""

    def __init__(
        self,
        service: DevicePluginService,
        kubelet_dir: Path,
        metrics: Metrics,
        *,
        socket_name: str = SOCKET_NAME,
        resource: str = RESOURCE_NAME,
        poll_s: float = 0.25,
        register_timeout_s: float = 10.0,
    ) -> None:
        self.service = service
        self.kubelet_dir = Path(kubelet_dir)
        self.socket_path = self.kubelet_dir / socket_name
        self.kubelet_socket = self.kubelet_dir / KUBELET_SOCKET
        self.metrics = metrics
        self.resource = resource
        self.poll_s = poll_s
        self.register_timeout_s = register_timeout_s
        self.registered = False
        self.registrations = 0
        self._server: grpc.aio.Server | None = None
        self._socket_stamp: tuple[int, int] | None = None

    async def _start(self) -> None:
        await self._stop()
        self.kubelet_dir.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
        server = grpc.aio.server()
        api_pb2_grpc.add_DevicePluginServicer_to_server(self.service, server)
        server.add_insecure_port(f"unix://{self.socket_path}")
        await server.start()
        self._server = server
        self._socket_stamp = _stamp(self.socket_path)
        log.info("serving the device plugin API", extra={"socket": str(self.socket_path)})

    async def _stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            await server.stop(grace=0.5)

    async def _register(self) -> None:
        request = api_pb2.RegisterRequest(version=KUBELET_API_VERSION, endpoint=self.socket_path.name,
                                          resource_name=self.resource, options=OPTIONS)
        async with grpc.aio.insecure_channel(f"unix://{self.kubelet_socket}") as channel:
            stub = api_pb2_grpc.RegistrationStub(channel)
            await stub.Register(request, timeout=self.register_timeout_s)

    async def run(self) -> None:
        """Serve, register, and do both again whenever the kubelet restarts. Never returns."""
        kubelet_stamp: tuple[int, int] | None = None
        try:
            while True:
                if self._server is None or _stamp(self.socket_path) != self._socket_stamp:
                    if self._server is not None:
                        log.info("our socket was removed (kubelet restart?): serving anew")
                    await self._start()
                    self.registered = False
                current = _stamp(self.kubelet_socket)
                if current is not None and (current != kubelet_stamp or not self.registered):
                    if self.registered:
                        log.info("kubelet.sock was recreated (kubelet restart): registering again")
                    self.registered = False
                    try:
                        await self._register()
                    except Exception as exc:  # any failure: the kubelet may be restarting; try again
                        self.metrics.registration(False)
                        reason = (f"{exc.code().name}: {exc.details()}" if isinstance(exc, grpc.aio.AioRpcError)
                                  else str(exc) or type(exc).__name__)
                        log.warning("registration with the kubelet failed; retrying", extra={
                            "kubelet_socket": str(self.kubelet_socket), "error": reason})
                        await asyncio.sleep(max(self.poll_s, 0.5))
                        continue
                    kubelet_stamp = current
                    self.registered = True
                    self.registrations += 1
                    self.metrics.registration(True)
                    log.info("registered with the kubelet", extra={"resource": self.resource,
                                                                    "endpoint": self.socket_path.name})
                elif current is None and self.registered:
                    log.info("kubelet.sock is gone: waiting for the kubelet")
                    self.registered = False
                await asyncio.sleep(self.poll_s)
        finally:
            await self._stop()
            with contextlib.suppress(OSError):
                if _stamp(self.socket_path) == self._socket_stamp:
                    os.unlink(self.socket_path)
