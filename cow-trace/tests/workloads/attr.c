/* Ground truth for attribution (tests/attribution.rs): after a fork, the
 * child's write_big() copies BIG pages of big_array (.bss) and
 * write_small() SMALL pages of small_array (.data), one write per page.
 * The parent owns every page before the fork, so each write copies. */
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#define PAGE 4096
#define BIG 3000
#define SMALL 700

char big_array[BIG * PAGE] __attribute__((aligned(4096)));
char small_array[SMALL * PAGE] __attribute__((aligned(4096))) = {1};

__attribute__((noinline)) void write_big(void) {
    for (long i = 0; i < BIG; i++)
        ((volatile char *)big_array)[i * PAGE] = 2;
}

__attribute__((noinline)) void write_small(void) {
    for (long i = 0; i < SMALL; i++)
        ((volatile char *)small_array)[i * PAGE] = 3;
}

int main(void) {
    madvise(big_array, sizeof big_array, MADV_NOHUGEPAGE);
    madvise(small_array, sizeof small_array, MADV_NOHUGEPAGE);
    memset(big_array, 1, sizeof big_array);
    memset(small_array, 1, sizeof small_array);
    pid_t c = fork();
    if (c == 0) {
        write_big();
        write_small();
        _exit(0);
    }
    int st;
    if (waitpid(c, &st, 0) != c)
        return 2;
    return WIFEXITED(st) && WEXITSTATUS(st) == 0 ? 0 : 1;
}
