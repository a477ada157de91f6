#ifndef FLEETGATE_HEAP_STATS_H
#define FLEETGATE_HEAP_STATS_H

#include <stddef.h>

/// Bytes the C allocator has handed out and not taken back (glibc: `mallinfo2()`, `uordblks + hblkhd`: chunks in use
/// in every arena plus mmapped chunks); 0 where it cannot tell. Unlike the resident set it does not keep the arenas'
/// free pages or fragmentation, so it comes back down when connections are closed: the measure of a leak.
size_t fleetgate_heap_in_use(void);

#endif
