#ifndef FLEETGATE_CHIREDIS_SHIM_H
#define FLEETGATE_CHIREDIS_SHIM_H

// Debian's libhiredis-dev (hiredis 0.14.1). Only the RedisClient module imports this.
#include <hiredis/hiredis.h>
#include <hiredis/read.h>

/// The reader's error text (`errstr` is a char array, which Swift imports as a tuple).
static inline const char *fg_reader_errstr(const redisReader *reader) {
    return reader->errstr;
}

/// The reader's error code (REDIS_ERR_PROTOCOL, REDIS_ERR_OOM, ...), 0 when none.
static inline int fg_reader_err(const redisReader *reader) {
    return reader->err;
}

/// Keep at most `maxbuf` bytes of unused buffer between replies (0 = never shrink).
static inline void fg_reader_set_maxbuf(redisReader *reader, size_t maxbuf) {
    reader->maxbuf = maxbuf;
}

/// The reply's type as a plain int (REDIS_REPLY_STRING, ...).
static inline int fg_reply_type(const redisReply *reply) { return reply->type; }

#endif
