/*
 * clock-offset: an LD_PRELOAD library for the chaos runner's clock jumps (fleetgate chaos, fault "clock-jump").
 *
 * Adds an offset in seconds, read from the file named by $FLEETGATE_CLOCK_OFFSET_FILE (a decimal number, may be
 * negative; re-read at most every 20 ms), to CLOCK_REALTIME (clock_gettime), gettimeofday and time. The process's
 * monotonic clocks are left alone. Redis's TIME and key TTLs follow it. Debian's libfaketime recurses inside
 * redis-server 7.0 and hangs it; this reads the real clock through the raw clock_gettime system call, so nothing here
 * calls back into itself. Built by scripts/chaos and scripts/test: cc -shared -fPIC -O2 -o libclockoffset.so clock-offset.c
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

static volatile long long offset_ns = 0;
static volatile long long read_at_ns = -1;

static long long raw_ns(clockid_t clock) {
    struct timespec ts;
    syscall(SYS_clock_gettime, clock, &ts);
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static long long current_offset(void) {
    long long now = raw_ns(CLOCK_MONOTONIC);
    if (read_at_ns >= 0 && now - read_at_ns < 20000000LL) return offset_ns;
    read_at_ns = now;
    const char *path = getenv("FLEETGATE_CLOCK_OFFSET_FILE");
    if (path == NULL) return offset_ns;
    int fd = (int)syscall(SYS_openat, AT_FDCWD, path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return offset_ns;
    char text[64];
    long count = (long)syscall(SYS_read, fd, text, sizeof text - 1);
    syscall(SYS_close, fd);
    if (count <= 0) return offset_ns;
    text[count] = 0;
    /* Seconds with an optional fraction and sign, without strtod (no locale, no allocation). */
    const char *p = text;
    int negative = 0;
    if (*p == '-') { negative = 1; p++; } else if (*p == '+') { p++; }
    long long whole = 0, fraction = 0, scale = 1000000000LL;
    while (*p >= '0' && *p <= '9') { whole = whole * 10 + (*p - '0'); p++; }
    if (*p == '.') {
        p++;
        while (*p >= '0' && *p <= '9' && scale > 1) { scale /= 10; fraction += (*p - '0') * scale; p++; }
    }
    long long value = whole * 1000000000LL + fraction;
    offset_ns = negative ? -value : value;
    return offset_ns;
}

static void shift(struct timespec *ts) {
    long long ns = (long long)ts->tv_sec * 1000000000LL + ts->tv_nsec + current_offset();
    ts->tv_sec = (time_t)(ns / 1000000000LL);
    ts->tv_nsec = (long)(ns % 1000000000LL);
    if (ts->tv_nsec < 0) { ts->tv_nsec += 1000000000L; ts->tv_sec -= 1; }
}

int clock_gettime(clockid_t clock, struct timespec *ts) {
    long result = (long)syscall(SYS_clock_gettime, clock, ts);
    if (result == 0 && (clock == CLOCK_REALTIME || clock == CLOCK_REALTIME_COARSE)) shift(ts);
    return (int)result;
}

int gettimeofday(struct timeval *tv, void *tz) {
    (void)tz;
    struct timespec ts;
    syscall(SYS_clock_gettime, CLOCK_REALTIME, &ts);
    shift(&ts);
    tv->tv_sec = ts.tv_sec;
    tv->tv_usec = ts.tv_nsec / 1000;
    return 0;
}

time_t time(time_t *out) {
    struct timespec ts;
    syscall(SYS_clock_gettime, CLOCK_REALTIME, &ts);
    shift(&ts);
    if (out != NULL) *out = ts.tv_sec;
    return ts.tv_sec;
}
