/*
 * pagerace -- several threads fetch the same code pages for the first time at once.
 *
 * Exercises: concurrent first fetches. A virtualizer that keeps code pages
 * non-executable until it has scanned them sees one fetch fault per thread on the
 * same page, queued while it handles the first; by the time it looks at the others
 * the page is scanned and executable, and those faults are its own, not the
 * guest's. Eight threads wait on a barrier, then all call the same sixteen
 * functions, each alone on its page, in the same order.
 *
 * Usage: pagerace
 * Expected: "pagerace: ok <sum>" (the sum is fixed), exit 0.
 */
#include <pthread.h>
#include <stdio.h>

#define NTHREADS 8
#define NPAGES   16

#define PAGE_FN(n) \
    __attribute__((noinline, aligned(4096))) static long f##n(long x) { return x * (n + 3) + n; }
PAGE_FN(0) PAGE_FN(1) PAGE_FN(2) PAGE_FN(3) PAGE_FN(4) PAGE_FN(5) PAGE_FN(6) PAGE_FN(7)
PAGE_FN(8) PAGE_FN(9) PAGE_FN(10) PAGE_FN(11) PAGE_FN(12) PAGE_FN(13) PAGE_FN(14) PAGE_FN(15)

static long (*const fns[NPAGES])(long) = {f0, f1, f2, f3, f4, f5, f6, f7,
                                          f8, f9, f10, f11, f12, f13, f14, f15};
static pthread_barrier_t barrier;
static long sums[NTHREADS];

static void *worker(void *arg) {
    long i = (long)arg, x = i;
    pthread_barrier_wait(&barrier);
    for (int n = 0; n < NPAGES; n++)
        x = fns[n](x) & 0xffff;
    sums[i] = x;
    return NULL;
}

int main(void) {
    pthread_t threads[NTHREADS];
    long total = 0;
    pthread_barrier_init(&barrier, NULL, NTHREADS);
    for (long i = 0; i < NTHREADS; i++)
        if (pthread_create(&threads[i], NULL, worker, (void *)i))
            return 2;
    for (int i = 0; i < NTHREADS; i++) {
        pthread_join(threads[i], NULL);
        total += sums[i];
    }
    printf("pagerace: ok %ld\n", total);
    return 0;
}
