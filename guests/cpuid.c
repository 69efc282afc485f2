/*
 * cpuid -- the CPUID instruction.
 *
 * Exercises: `cpuid` executed from inline asm (a sensitive instruction the
 * virtualizer traps or patches).  Prints only values that are identical on
 * every core of the machine and between runs: the vendor string and max
 * basic leaf (leaf 0), the leaf-1 ECX/EDX feature bits (ECX bit 27,
 * OSXSAVE, is kept as is), and leaf-7 subleaf-0 EBX/ECX/EDX.  Leaf-1 EBX is
 * deliberately NOT printed: it holds the initial APIC id, which differs per
 * core.
 * Expected: four lines of machine-specific but run-stable text, exit 0.
 */
#include <stdio.h>
#include <string.h>

static void cpuid(unsigned leaf, unsigned sub, unsigned r[4])
{
    __asm__ volatile ("cpuid"
                      : "=a"(r[0]), "=b"(r[1]), "=c"(r[2]), "=d"(r[3])
                      : "0"(leaf), "2"(sub));
}

int main(void)
{
    unsigned r[4];
    char vendor[13];

    cpuid(0, 0, r);
    memcpy(vendor + 0, &r[1], 4);   /* EBX */
    memcpy(vendor + 4, &r[3], 4);   /* EDX */
    memcpy(vendor + 8, &r[2], 4);   /* ECX */
    vendor[12] = '\0';
    unsigned max_leaf = r[0];
    printf("vendor: %s\n", vendor);
    printf("max basic leaf: 0x%x\n", max_leaf);

    if (max_leaf >= 1) {
        cpuid(1, 0, r);
        printf("leaf1 ecx: 0x%08x edx: 0x%08x osxsave: %u\n",
               r[2], r[3], (r[2] >> 27) & 1);
    }
    if (max_leaf >= 7) {
        cpuid(7, 0, r);
        printf("leaf7.0 ebx: 0x%08x ecx: 0x%08x edx: 0x%08x\n",
               r[1], r[2], r[3]);
    }
    return 0;
}
