/*
 * libc_demo -- a typical glibc program (built as libc_static and
 * libc_dynamic).
 *
 * Exercises: glibc start-up (static: IRELATIVE/ifunc resolution and TLS set
 * up inside the binary; dynamic: ld.so, relocation, lazy or bind-now PLT),
 * stdio formatting, malloc/free of small to mmap-sized blocks, qsort with a
 * comparison callback (indirect calls from libc back into the program), and
 * the ifunc-selected string routines (strlen/memcpy/strcmp, whose variant
 * choice depends on cpuid).  All data comes from a fixed-seed LCG.
 * Expected: fixed text (identical for both builds), exit 0.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static uint32_t lcg_state = 20240521u;

static uint32_t lcg(void)
{
    lcg_state = lcg_state * 1664525u + 1013904223u;
    return lcg_state;
}

static int cmp_int(const void *a, const void *b)
{
    int x = *(const int *)a, y = *(const int *)b;
    return (x > y) - (x < y);
}

int main(void)
{
    /* printf with assorted formats */
    printf("fmt: [%d] [%5d] [%-5d] [%05d] [%+d]\n", -42, 42, 42, 42, 42);
    printf("fmt: [%x] [%X] [%#o] [%lu] [%lld]\n", 48879u, 48879u, 8u,
           4000000000ul, -9000000000000ll);
    printf("fmt: [%s] [%10s] [%-10s] [%.3s] [%c]\n", "sbe", "right", "left",
           "truncate", 'Z');
    printf("fmt: [%f] [%.3f] [%e] [%g] [%10.2f]\n", 3.14159265, 2.0 / 3.0,
           123456.789, 0.0001234, -1.5);
    printf("fmt: [%zu] [%%] [%hhd]\n", sizeof(uint64_t), (signed char)-1);

    /* malloc/free of varied sizes */
    static const size_t sizes[] = { 1, 7, 16, 24, 100, 1000, 4096, 10000,
                                    65536, 200000, 1u << 20, 3 };
    uint32_t msum = 0;
    void *blocks[sizeof sizes / sizeof sizes[0]];
    for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; i++) {
        unsigned char *b = malloc(sizes[i]);
        if (!b) {
            printf("malloc failed\n");
            return 1;
        }
        for (size_t j = 0; j < sizes[i]; j++)
            b[j] = (unsigned char)(j * 7 + i);
        blocks[i] = b;
    }
    for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; i++) {
        const unsigned char *b = blocks[i];
        for (size_t j = 0; j < sizes[i]; j += 1 + (j & 3))
            msum = msum * 31 + b[j];
        free(blocks[i]);
    }
    printf("malloc: %zu blocks checksum=0x%08x\n",
           sizeof sizes / sizeof sizes[0], msum);

    /* qsort with a callback */
    enum { N = 1000 };
    int *arr = malloc(N * sizeof *arr);
    for (int i = 0; i < N; i++)
        arr[i] = (int)(lcg() % 100000) - 50000;
    qsort(arr, N, sizeof *arr, cmp_int);
    int sorted = 1;
    uint32_t qsum = 0;
    for (int i = 0; i < N; i++) {
        if (i > 0 && arr[i - 1] > arr[i])
            sorted = 0;
        qsum = qsum * 33 + (uint32_t)arr[i];
    }
    printf("qsort: n=%d sorted=%s min=%d median=%d max=%d checksum=0x%08x\n",
           N, sorted ? "yes" : "no", arr[0], arr[N / 2], arr[N - 1], qsum);
    free(arr);

    /* string routines */
    char buf[128];
    const char *src = "the quick brown fox jumps over the lazy dog";
    size_t len = strlen(src);
    memcpy(buf, src, len + 1);
    buf[4] = 'Q';
    printf("string: len=%zu copy=\"%s\" cmp_eq=%d cmp_sign=%d\n", len, buf,
           strcmp(src, src), (strcmp(buf, src) > 0) - (strcmp(buf, src) < 0));
    return 0;
}
