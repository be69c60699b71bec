# cython: language_level=3
# Augmenting declarations for ``_kernel.py`` compiled as ``octoproxy.core._kernel_c``
# (Cython pure-Python mode): the kernel's classes become extension types whose
# fields are C members. The .py stays the one source; this file only types it.
# Keep every attribute the .py assigns declared here (a missing one is an
# AttributeError in the compiled build only: tests run both builds).

cimport cython
from octoproxy.protocol._fastframe cimport Scanner as CScanner

cdef class Cluster
cdef class Engine


cdef class Link:
    cdef public int kind
    cdef public str name
    cdef public bytearray out
    cdef public bint closed
    cdef public bint draining
    cdef public bint goaway_sent
    cdef public Py_ssize_t phead
    cdef public Py_ssize_t npending
    cdef public object endpoint
    cdef public Cluster cluster
    cdef public Py_ssize_t inflight
    cdef public bint reject
    cdef public object awaiting_pong
    cdef public double last_rx
    cdef public double last_tx
    cdef public str listener
    cdef public object on_idle
    cdef public object on_goaway
    cdef public object io
    cdef public object peer


cdef class Cluster:
    cdef public str name
    cdef public str lb
    cdef public list endpoints
    cdef public dict links
    cdef public object balancer
    cdef public Py_ssize_t connecting
    cdef public Py_ssize_t picks
    cdef public object gov
    cdef public bint rr
    cdef public object rr_for
    cdef long long[::1] rr_scores

    @cython.locals(n=Py_ssize_t, i=Py_ssize_t, total=cython.longlong, best=Py_ssize_t, best_score=cython.longlong, w=cython.longlong, score=cython.longlong)
    cpdef object _rr_pick(self)
    cpdef Link pick(self)


cdef class StatsTable:
    cdef public object stats
    cdef public list objs
    cdef public dict ids
    cdef public Py_ssize_t n
    cdef public Py_ssize_t cap
    cdef public Py_ssize_t ns
    cdef public Py_ssize_t nb
    cdef unsigned long long[::1] counts
    cdef unsigned long long[::1] hist
    cdef double[::1] hsum
    cdef double[::1] bounds
    cdef unsigned char[::1] touched
    cdef public list dirty

    @cython.locals(i=Py_ssize_t, last=Py_ssize_t)
    cpdef record(self, Py_ssize_t sid, long long status, double seconds)


cdef class Pending:
    cdef public object down
    cdef public unsigned long long down_sid
    cdef public object up
    cdef public double deadline
    cdef public double t0
    cdef public object stats
    cdef public object gov


cdef class PendingTable:
    cdef public StatsTable rstats
    cdef public Py_ssize_t cap
    cdef public Py_ssize_t count
    cdef public Py_ssize_t free
    cdef public long long wheel_tick
    cdef public Py_ssize_t mask
    # the slot arrays (``array.array`` buffers, typed views when compiled)
    cdef unsigned int[::1] gen
    cdef int[::1] lnext
    cdef int[::1] lprev
    cdef int[::1] wnext
    cdef int[::1] wprev
    cdef unsigned long long[::1] down_sid
    cdef double[::1] deadline
    cdef double[::1] t0
    cdef public list down
    cdef public list up
    cdef int[::1] sid
    cdef public list gov
    cdef int[::1] wheel

    @cython.locals(slot=Py_ssize_t, head=Py_ssize_t, tick=cython.longlong, b=Py_ssize_t, g=cython.ulonglong)
    cpdef unsigned long long add(self, Link down, unsigned long long down_sid, Link up, double deadline, double t0, int stats_id, object gov) except? 0
    @cython.locals(slot=Py_ssize_t)
    cpdef Py_ssize_t find(self, Link up, unsigned long long usid)
    @cython.locals(up=Link, down=Link, nxt=Py_ssize_t, prv=Py_ssize_t, g=cython.ulonglong)
    cpdef remove(self, Py_ssize_t slot)
    @cython.locals(g=cython.ulonglong)
    cpdef unsigned long long usid_of(self, Py_ssize_t slot)
    @cython.locals(tick=cython.longlong, k=Py_ssize_t, slot=Py_ssize_t, t=cython.longlong, best=double)
    cpdef double next_due(self)
    @cython.locals(cur=cython.longlong, start=cython.longlong, n=cython.longlong, k=cython.longlong, slot=Py_ssize_t)
    cpdef list due(self, double now)


cdef class Route:
    cdef readonly str service
    cdef readonly str method
    cdef readonly str cluster
    cdef readonly double timeout
    cdef readonly double max_timeout


cdef class Engine:
    cdef public double park_timeout
    cdef public dict clusters
    cdef public Py_ssize_t max_pending
    cdef public double default_timeout
    cdef public double inbound_max_timeout
    cdef public Py_ssize_t high_watermark
    cdef public Py_ssize_t max_frame_size
    cdef public object stats
    cdef public bytes stamp
    cdef public PendingTable table
    cdef public StatsTable rstats
    cdef public list dirty
    cdef public object drain_mode
    cdef public object inbound_guard
    cdef public dict rs_cache
    cdef public object key_cache
    cdef public object on_unknown_service
    cdef public object held
    cdef public double unrouted_timeout
    cdef public object _replaying_since
    cdef public dict _shared_scanners
    cdef public object outbound
    cdef public object inbound
    cdef public object policies
    cdef public str service
    cdef public object locality
    cdef public long long clock_offset_ms
    cdef public object _gov_rng
    cdef public list _route_gov
    cdef public double _gov_now
    cdef public Py_ssize_t inbound_instances
    cdef public Cluster _inbound_cluster
    cdef public Cluster _inbound_fast
    cdef public list routes
    cdef public list _route_timeouts
    cdef public list _route_max_timeouts
    cdef public object route_table
    cdef public list _route_clusters_all
    cdef public list _route_clusters


# -- the fast path (module functions)
cpdef forward(Engine engine, Link down, Link up, CScanner sc, Py_ssize_t i, object mv, double now, double route_timeout, double max_timeout, bint oneway)

@cython.locals(off=Py_ssize_t, size=Py_ssize_t, o=Py_ssize_t, out=bytearray, stamp=bytes, dirty=list, t=cython.uint,
               timeout=double, deadline=double, stats_id=int, usid=cython.ulonglong)
cdef int _forward(Engine engine, Link down, Link up, CScanner sc, Py_ssize_t i, const unsigned char[::1] buf, double now,
                  double route_timeout, double max_timeout, bint oneway) except -1

@cython.locals(stats_id=int, cache=dict, key=bytes)
cdef int _stats_id(Engine engine, bint inbound, const unsigned char[::1] buf, CScanner sc, Py_ssize_t i) except -1

@cython.locals(i=Py_ssize_t, off=Py_ssize_t, inbound=bint, high=Py_ssize_t, stamp_len=Py_ssize_t, max_size=Py_ssize_t,
               route_clusters=list, route_timeouts=list, route_max_timeouts=list, max_pending=Py_ssize_t,
               table=PendingTable, route_timeout=double, max_timeout=double, route_id=int, cluster=Cluster, up=Link,
               buf="const unsigned char[::1]")
cpdef relay_requests(Engine engine, Link down, CScanner sc, Py_ssize_t n, object mv, double now)

@cython.locals(i=Py_ssize_t, slot=Py_ssize_t, table=PendingTable, rstats=StatsTable, down=Link, stats_id=int,
               t0=double, down_sid=cython.ulonglong, out=bytearray, o=Py_ssize_t, dirty=list,
               buf="const unsigned char[::1]")
cpdef relay_responses(Engine engine, Link up, CScanner sc, Py_ssize_t n, object mv, double now)
