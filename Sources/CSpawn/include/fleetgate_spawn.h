#ifndef FLEETGATE_SPAWN_H
#define FLEETGATE_SPAWN_H

#include <sys/types.h>

/// Starts `path` with `argv` and `envp` (NULL-terminated) through `posix_spawn`: stdin from /dev/null, stdout and
/// stderr onto `out_fd` and `err_fd`, in `directory` (NULL: this process's), every other descriptor closed in the
/// child (`closefrom(3)`), in a process group of its own, with an empty signal mask and default signal dispositions. Returns 0 and sets `*pid`, or
/// an errno value.
///
/// Foundation's `Process.run()` on Linux scans `/proc/self/fd` with a 256-byte copy per entry that over-reads
/// glibc's `readdir` buffer (swift-corelibs-foundation PR #5472): with thousands of descriptors open (the chaos
/// runner's load) it crashed within a few launches. glibc's `posix_spawn_file_actions_addclosefrom_np` needs no scan.
int fleetgate_spawn(const char *path, char *const argv[], char *const envp[], const char *directory, int out_fd, int err_fd,
                    pid_t *pid);

#endif
