"""etcdserverpb.Maintenance and etcdserverpb.Cluster: status, health, backups, members."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import grpc

from k8s_sql import errors
from k8s_sql.api.common import Context
from k8s_sql.pb import rpc_pb2 as pb, rpc_pb2_grpc


class MaintenanceServicer(rpc_pb2_grpc.MaintenanceServicer):
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.store = ctx.store

    async def Alarm(self, request: pb.AlarmRequest, context: grpc.aio.ServicerContext) -> pb.AlarmResponse:
        """etcd's Alarm: GET lists the raised alarms (of one type, or all for NONE);
        ACTIVATE and DEACTIVATE answer the alarm they changed, if any. NOSPACE: see
        store/space.py. CORRUPT is raised when the database lost commits already
        served (store/corruption.py); its DEACTIVATE accepts the loss. A client's
        CORRUPT activation changes nothing: the database keeps its own checksums."""
        space = self.ctx.space
        corruption = self.store.corruption
        resp = pb.AlarmResponse(header=self.ctx.header())
        nospace = request.alarm == pb.NOSPACE
        if request.action == pb.AlarmRequest.GET:
            if request.alarm in (pb.NONE, pb.NOSPACE):
                resp.alarms.extend(pb.AlarmMember(memberID=m, alarm=pb.NOSPACE) for m, _ in await space.alarms())
            if request.alarm in (pb.NONE, pb.CORRUPT):
                resp.alarms.extend(pb.AlarmMember(memberID=m, alarm=pb.CORRUPT) for m, _ in await corruption.alarms())
        elif request.action == pb.AlarmRequest.ACTIVATE:
            if nospace and not space.nospace:
                await space.activate(request.memberID)
                resp.alarms.add(memberID=space.raised_by, alarm=pb.NOSPACE)
        elif request.action == pb.AlarmRequest.DEACTIVATE and nospace and await space.disarm(request.memberID):
            resp.alarms.add(memberID=request.memberID, alarm=pb.NOSPACE)
        elif (
            request.action == pb.AlarmRequest.DEACTIVATE
            and request.alarm == pb.CORRUPT
            and await corruption.disarm(request.memberID)
        ):
            resp.alarms.add(memberID=request.memberID, alarm=pb.CORRUPT)
        return resp

    async def Status(self, request: pb.StatusRequest, context: grpc.aio.ServicerContext) -> pb.StatusResponse:
        rev, _ = await self.store.current()
        size, in_use = await self.store.size()
        ident = self.ctx.identity
        return pb.StatusResponse(
            header=self.ctx.header(),
            version=self.ctx.version,
            dbSize=size,
            dbSizeInUse=in_use,
            leader=self.ctx.membership.leader_id or ident.member_id,
            raftIndex=rev,
            raftTerm=ident.raft_term,
            raftAppliedIndex=rev,
            storageVersion=self.ctx.version.rsplit(".", 1)[0] + ".0",
            errors=[  # Go's String() of each AlarmMember
                *(f"memberID:{m} alarm:NOSPACE " for m, _ in await self.ctx.space.alarms()),
                *(f"memberID:{m} alarm:CORRUPT " for m, _ in await self.store.corruption.alarms()),
            ],
        )

    async def Defragment(
        self, request: pb.DefragmentRequest, context: grpc.aio.ServicerContext
    ) -> pb.DefragmentResponse:
        await self.store.defragment()
        return pb.DefragmentResponse(header=self.ctx.header())

    async def Hash(self, request: pb.HashRequest, context: grpc.aio.ServicerContext) -> pb.HashResponse:
        h, _, _ = await self.store.hash_kv(0)
        return pb.HashResponse(header=self.ctx.header(), hash=h)

    async def HashKV(self, request: pb.HashKVRequest, context: grpc.aio.ServicerContext) -> pb.HashKVResponse:
        h, compact, at = await self.store.hash_kv(request.revision)
        return pb.HashKVResponse(header=self.ctx.header(), hash=h, compact_revision=compact, hash_revision=at)

    async def Snapshot(
        self, request: pb.SnapshotRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.SnapshotResponse]:
        """Stream a consistent copy of the store: an SQLite database file followed, as
        etcd does, by the SHA-256 of its bytes (etcdctl checks it is there).
        ``k8s-sql restore`` verifies the digest and turns the file into a data directory."""
        first = True
        async with contextlib.aclosing(self.store.snapshot()) as frames:
            async for remaining, blob in frames:
                resp = pb.SnapshotResponse(header=self.ctx.header(), remaining_bytes=remaining, blob=blob)
                if first:
                    resp.version = self.ctx.version
                    first = False
                yield resp

    async def MoveLeader(
        self, request: pb.MoveLeaderRequest, context: grpc.aio.ServicerContext
    ) -> pb.MoveLeaderResponse:
        raise errors.NotCapable()

    async def Downgrade(self, request: pb.DowngradeRequest, context: grpc.aio.ServicerContext) -> pb.DowngradeResponse:
        raise errors.NotCapable()


class ClusterServicer(rpc_pb2_grpc.ClusterServicer):
    """Members are k8s-sql frontends; they join and leave by starting and stopping,
    so the membership-changing calls answer etcd's "not capable"."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    async def MemberList(
        self, request: pb.MemberListRequest, context: grpc.aio.ServicerContext
    ) -> pb.MemberListResponse:
        """The live frontends on this database (those that heartbeat recently)."""
        ident = self.ctx.identity
        live = {m.id: m for m in await self.ctx.membership.live_members()}
        members = [pb.Member(ID=ident.member_id, name=ident.name, clientURLs=ident.client_urls)]
        members += [
            pb.Member(ID=m.id, name=m.name, clientURLs=[u for u in m.client_urls.split(",") if u])
            for m in live.values()
            if m.id != ident.member_id
        ]
        members.sort(key=lambda m: m.ID)
        return pb.MemberListResponse(header=self.ctx.header(), members=members)

    async def MemberAdd(self, request: pb.MemberAddRequest, context: grpc.aio.ServicerContext) -> pb.MemberAddResponse:
        raise errors.NotCapable()

    async def MemberRemove(
        self, request: pb.MemberRemoveRequest, context: grpc.aio.ServicerContext
    ) -> pb.MemberRemoveResponse:
        raise errors.NotCapable()

    async def MemberUpdate(
        self, request: pb.MemberUpdateRequest, context: grpc.aio.ServicerContext
    ) -> pb.MemberUpdateResponse:
        raise errors.NotCapable()

    async def MemberPromote(
        self, request: pb.MemberPromoteRequest, context: grpc.aio.ServicerContext
    ) -> pb.MemberPromoteResponse:
        raise errors.NotCapable()


class AuthServicer(rpc_pb2_grpc.AuthServicer):
    """Authentication is not enabled (k8s-sql has no users yet): AuthStatus says so,
    and every other Auth call answers etcd's "authentication is not enabled"."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    async def AuthStatus(
        self, request: pb.AuthStatusRequest, context: grpc.aio.ServicerContext
    ) -> pb.AuthStatusResponse:
        return pb.AuthStatusResponse(header=self.ctx.header(), enabled=False)


async def _auth_not_enabled(self: AuthServicer, request: object, context: grpc.aio.ServicerContext) -> None:
    raise errors.AuthNotEnabled()


for _method in (
    "AuthEnable", "AuthDisable", "Authenticate", "UserAdd", "UserGet", "UserList", "UserDelete",
    "UserChangePassword", "UserGrantRole", "UserRevokeRole", "RoleAdd", "RoleGet", "RoleList",
    "RoleDelete", "RoleGrantPermission", "RoleRevokePermission",
):  # fmt: skip
    setattr(AuthServicer, _method, _auth_not_enabled)
