# cython: language_level=3
# Augmenting declarations for ``_kernel.py`` compiled as ``octoproxy.core._kernel_c``
# (Cython pure-Python mode): the kernel's classes become extension types whose
# fields are C members. The .py stays the one source; this file only types it.
# Keep every attribute the .py assigns declared here (a missing one is an
# AttributeError in the compiled build only: tests run both builds).

cdef class Cluster
cdef class Engine


cdef class Link:
    cdef public int kind
    cdef public str name
    cdef public bytearray out
    cdef public bint closed
    cdef public bint draining
    cdef public bint goaway_sent
    cdef public dict pending
    cdef public unsigned long long next_sid
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
    cdef public Py_ssize_t pending_count
    cdef public list dirty
    cdef public object drain_mode
    cdef public object inbound_guard
    cdef public dict timer_wheel
    cdef public list timer_keys
    cdef public dict rs_cache
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
