/*
 * A stand-in for bcryptprimitives.dll, for running the agent under Wine 8.0 only, which
 * lacks it: Rust's standard library (1.78 and later) takes its randomness from
 * ProcessPrng there. Windows 10 and later ship the real one; this file is never part of
 * a release. `cargo xtask windows-smoke` builds it next to the test's collector.exe.
 */
#include <windows.h>

/* RtlGenRandom, exported by advapi32 under this name. */
BOOLEAN WINAPI SystemFunction036(PVOID buffer, ULONG length);

BOOL WINAPI ProcessPrng(PBYTE data, SIZE_T len)
{
    while (len > 0) {
        ULONG chunk = len > 0x7fffffff ? 0x7fffffff : (ULONG)len;
        if (!SystemFunction036(data, chunk)) {
            return FALSE;
        }
        data += chunk;
        len -= chunk;
    }
    return TRUE;
}
