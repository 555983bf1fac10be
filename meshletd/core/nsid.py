"""Every NSID meshlet speaks, once: the record collections (`commune.scheduler.*`) and the
XRPC methods (`farm.meshlet.*`). Each names a file under `lexicons/`, which says what it
means; a unit test checks that every constant here has its lexicon and every lexicon its
constant. Standard library only (the core imports it)."""

from __future__ import annotations

# -- records (commune.scheduler.*) ----------------------------------------------------------
NSID_WORKLOAD = "commune.scheduler.workload"
NSID_BID = "commune.scheduler.bid"
NSID_STATUS = "commune.scheduler.workloadStatus"
NSID_USAGE = "commune.scheduler.usage"
NSID_MEMBERSHIP = "commune.scheduler.membership"
NSID_MESHLET_OWNER = "commune.scheduler.meshletOwner"
NSID_MESHLET = "commune.scheduler.meshlet"
NSID_LEASE = "commune.scheduler.lease"  # liveness of a meshlet without endpoint (§8)
NSID_HOST_POLICY = "commune.scheduler.hostPolicy"  # what a meshlet lends, to whom (§21)
NSID_DEFS = "commune.scheduler.defs"  # shared object definitions, no record

RECORD_NSIDS = frozenset(
    {
        NSID_WORKLOAD,
        NSID_BID,
        NSID_STATUS,
        NSID_USAGE,
        NSID_MEMBERSHIP,
        NSID_MESHLET_OWNER,
        NSID_MESHLET,
        NSID_LEASE,
        NSID_HOST_POLICY,
    }
)

# -- XRPC methods between meshlets and for owners (farm.meshlet.*) -------------------------
PING = "farm.meshlet.ping"
NOTIFY_RECORDS = "farm.meshlet.notifyRecords"
GET_CAPACITY = "farm.meshlet.getCapacity"
LIST_WORKLOADS = "farm.meshlet.listWorkloads"
GET_WORKLOAD_STATUS = "farm.meshlet.getWorkloadStatus"
DELETE_WORKLOAD = "farm.meshlet.deleteWorkload"
PAUSE_WORKLOAD = "farm.meshlet.pauseWorkload"
RESUME_WORKLOAD = "farm.meshlet.resumeWorkload"
DRAIN = "farm.meshlet.drain"
UNDRAIN = "farm.meshlet.undrain"
GET_LOGS = "farm.meshlet.getLogs"
GET_SECRET = "farm.meshlet.getSecret"
PUT_SECRET = "farm.meshlet.putSecret"
SHUTDOWN = "farm.meshlet.shutdown"

# -- the control socket's methods, for meshletctl (farm.meshlet.ctl.*) ----------------------
CTL_STATUS = "farm.meshlet.ctl.getStatus"
CTL_MEMBERS = "farm.meshlet.ctl.listMembers"
CTL_CREATE = "farm.meshlet.ctl.createWorkload"
CTL_BIDS = "farm.meshlet.ctl.getBids"
CTL_BALANCE = "farm.meshlet.ctl.getBalance"
CTL_USAGE = "farm.meshlet.ctl.getUsage"
CTL_HANDLES = "farm.meshlet.ctl.getHandles"
CTL_ENDPOINTS = "farm.meshlet.ctl.getEndpoints"
CTL_GET_POLICY = "farm.meshlet.ctl.getPolicy"
CTL_SET_POLICY = "farm.meshlet.ctl.setPolicy"

METHOD_NSIDS = frozenset(
    {
        PING,
        NOTIFY_RECORDS,
        GET_CAPACITY,
        LIST_WORKLOADS,
        GET_WORKLOAD_STATUS,
        DELETE_WORKLOAD,
        PAUSE_WORKLOAD,
        RESUME_WORKLOAD,
        DRAIN,
        UNDRAIN,
        GET_LOGS,
        GET_SECRET,
        PUT_SECRET,
        SHUTDOWN,
        CTL_STATUS,
        CTL_MEMBERS,
        CTL_CREATE,
        CTL_BIDS,
        CTL_BALANCE,
        CTL_USAGE,
        CTL_HANDLES,
        CTL_ENDPOINTS,
        CTL_GET_POLICY,
        CTL_SET_POLICY,
    }
)
