/*
 * fake_nvml.c: a test double of NVIDIA's NVML (libnvidia-ml.so.1), driven by a
 * fixture file, so that nodedev's NVIDIA driver runs against the real pynvml
 * bindings on a machine without a GPU.
 *
 * Built as a shared object whose SONAME is libnvidia-ml.so.1: once a process has
 * loaded it (ctypes.CDLL(path, RTLD_GLOBAL)), pynvml's own CDLL("libnvidia-ml.so.1")
 * resolves to it; a subprocess finds it through LD_LIBRARY_PATH.
 *
 * ENVIRONMENT
 *   NODEDEV_FAKE_NVML         fixture path, read when the init refcount goes 0 -> 1
 *                             (so nvmlShutdown + setting a new path + nvmlInit
 *                             switches fixtures in-process). Unset: nvmlInit
 *                             returns NVML_ERROR_DRIVER_NOT_LOADED (9).
 *   NODEDEV_FAKE_NVML_EVENTS  control file that tests APPEND lines to (optional).
 *                             Read from its start at every (re)init, then
 *                             incrementally: every API call and every 10 ms of an
 *                             nvmlEventSetWait picks up new complete lines.
 *   NODEDEV_FAKE_NVML_DEBUG   if set, every ingested control line is echoed to stderr.
 *
 * FIXTURE FORMAT (line oriented; '#' starts a comment at line start or after
 * whitespace; blank lines ignored; leading indentation ignored; each line is
 * "<key> <value...>" where the value is the rest of the line, trimmed)
 *
 *   Top-level keys (each also ends the current gpu/mig block):
 *     driver_version <text>        nvmlSystemGetDriverVersion   (default 550.54.15)
 *     nvml_version <text>          nvmlSystemGetNVMLVersion     (default 12.550.54.15)
 *     cuda_driver_version <int>    nvmlSystemGetCudaDriverVersion[_v2] (default 12040)
 *     init_error <code>            nvmlInit returns this NVML code (e.g. 9 = driver not loaded)
 *     gpu <index>                  starts a GPU block; indices dense 0,1,2... in order
 *     mig <parent-gpu-index>       starts a MIG device block (parent must be MIG enabled);
 *                                  MIG indices under a parent follow file order
 *     nvlink <gpuA> <gpuB> <n>     n NVLinks between A and B; takes the next n free
 *                                  link indices on each side (in file order)
 *     topology <gpuA> <gpuB> <LEVEL>   PCIe common ancestor; LEVEL is INTERNAL|SINGLE|
 *                                  MULTIPLE|HOSTBRIDGE|NODE|SYSTEM or its number
 *                                  (0/10/20/30/40/50). Unlisted pairs: NODE when both
 *                                  GPUs have the same numa_node, else SYSTEM; a GPU
 *                                  with itself: INTERNAL.
 *
 *   GPU block keys:
 *     uuid GPU-xxxxxxxx-...        required
 *     name <text>                  required, e.g. NVIDIA A100-SXM4-80GB
 *     bus_id 00000000:07:00.0      required, NVML form (domain 8 hex digits)
 *     minor <int>                  /dev/nvidia<minor> (default: the index)
 *     pci_device_id 0x20B210DE     (device << 16) | vendor, as NVML reports it
 *     pci_subsystem_id 0x147F10DE  (default 0)
 *     memory_total_mib <int>       memory_used_mib <int>   memory_reserved_mib <int>
 *     compute_capability 8.0
 *     numa_node <int>              for simulate.py's sysfs tree and nvmlDeviceGetNumaNodeId
 *                                  (-1 = none; default -1)
 *     mig_mode <current> <pending> 0/1 each; or "unsupported" (the default)
 *     max_mig_devices <int>        default 7 (reported only while MIG is enabled)
 *     supported_events 0x1F        nvmlDeviceGetSupportedEventTypes (default 0x1F)
 *     nvlink_count <int>           NVLink ports on the GPU (A100: 12); 0 = no NVLink
 *     multiprocessor_count <int>   for nvmlDeviceGetAttributes_v2
 *     serial <text>                nvmlDeviceGetSerial (absent: NOT_SUPPORTED)
 *     present 0|1                  0: not on the bus at start (default 1); `plug` adds it
 *
 *   MIG block keys:
 *     gpu_instance_id <int>        required    compute_instance_id <int>  required
 *     uuid MIG-xxxxxxxx-...        required
 *     profile 1g.10gb              required; the name defaults to
 *                                  "<parent name> MIG <profile>" as real NVML reports
 *     name <text>                  optional override
 *     memory_total_mib <int>       memory_used_mib <int>
 *     gpu_slices <int>  compute_slices <int>  multiprocessor_count <int>
 *                                  (nvmlDeviceGetAttributes_v2 of the MIG handle)
 *
 * CONTROL FILE SYNTAX (NODEDEV_FAKE_NVML_EVENTS; one command per line, each line
 * must end in '\n' to be read; '#' comments and blank lines ignored; bad lines
 * are reported on stderr and skipped)
 *     xid <gpu> <xid> [<gi> <ci>]   XidCriticalError (0x8), eventData = xid; gi/ci
 *                                   are 0xFFFFFFFF unless given (MIG)
 *     ecc <gpu> sbe|dbe             SingleBitEccError (0x1) / DoubleBitEccError (0x2)
 *     event <gpu> <type> <data> [<gi> <ci>]   any event type (numbers, 0x.. allowed)
 *     lost <gpu>                    from now on every call on that GPU (and its MIG
 *                                   devices, handle lookups included) returns
 *                                   NVML_ERROR_GPU_IS_LOST (15); an Xid 79 ("fallen
 *                                   off the bus") event is queued for it
 *     recover <gpu>                 the GPU answers normally again (no event)
 *     unplug <gpu>                  the GPU leaves the bus: every call on it returns
 *                                   GPU_IS_LOST and an Xid 79 event is queued, as for
 *                                   `lost`; from the next (re)init it is not listed
 *     plug <gpu>                    the GPU (a fixture block, e.g. one with
 *                                   `present 0`) arrives on the bus; like real NVML,
 *                                   it is listed from the next (re)init on, in
 *                                   fixture order (NVML indices stay dense)
 *     fail-wait [<message>]         the next nvmlEventSetWait on every event set that
 *                                   exists returns NVML_ERROR_UNKNOWN (999); the
 *                                   message is only echoed with NODEDEV_FAKE_NVML_DEBUG
 *
 * EVENT DELIVERY: every injected event gets a sequence number. An event set sees
 * an event once, if a registration on that set (nvmlDeviceRegisterEvents) covers
 * the event's GPU and type and was made before the event was read. Event data:
 * device = the (parent) GPU handle, eventType, eventData, gpuInstanceId and
 * computeInstanceId. nvmlEventSetWait[_v2] polls every 10 ms until timeout_ms and
 * then returns NVML_ERROR_TIMEOUT (10).
 *
 * LISTING: nvmlInit fixes which GPUs NVML lists (count, indices, lookups by
 * UUID or bus ID): the fixture's GPUs that are present after the control file
 * is replayed. A handle of a GPU not listed is INVALID_ARGUMENT.
 *
 * Everything is guarded by one mutex; a wait releases it between polls, so other
 * threads query freely while one thread sits in nvmlEventSetWait_v2.
 */

#define _GNU_SOURCE
#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define EXPORT __attribute__((visibility("default")))

/* ---- NVML ABI (types, constants and struct layouts as in nvml.h / pynvml) ---- */

typedef int nvmlReturn_t;

enum {
    NVML_SUCCESS = 0,
    NVML_ERROR_UNINITIALIZED = 1,
    NVML_ERROR_INVALID_ARGUMENT = 2,
    NVML_ERROR_NOT_SUPPORTED = 3,
    NVML_ERROR_NO_PERMISSION = 4,
    NVML_ERROR_ALREADY_INITIALIZED = 5,
    NVML_ERROR_NOT_FOUND = 6,
    NVML_ERROR_INSUFFICIENT_SIZE = 7,
    NVML_ERROR_DRIVER_NOT_LOADED = 9,
    NVML_ERROR_TIMEOUT = 10,
    NVML_ERROR_GPU_IS_LOST = 15,
    NVML_ERROR_MEMORY = 20,
    NVML_ERROR_ARGUMENT_VERSION_MISMATCH = 25,
    NVML_ERROR_UNKNOWN = 999,
};

#define NVML_DEVICE_PCI_BUS_ID_BUFFER_SIZE 32
#define NVML_DEVICE_PCI_BUS_ID_BUFFER_V2_SIZE 16
#define NVML_NVLINK_MAX_LINKS 36

typedef struct {
    char busIdLegacy[NVML_DEVICE_PCI_BUS_ID_BUFFER_V2_SIZE];
    unsigned int domain;
    unsigned int bus;
    unsigned int device;
    unsigned int pciDeviceId;
    unsigned int pciSubSystemId;
    char busId[NVML_DEVICE_PCI_BUS_ID_BUFFER_SIZE];
} nvmlPciInfo_t;

typedef struct {
    unsigned long long total;
    unsigned long long free;
    unsigned long long used;
} nvmlMemory_t;

typedef struct {
    unsigned int version;
    unsigned long long total;
    unsigned long long reserved;
    unsigned long long free;
    unsigned long long used;
} nvmlMemory_v2_t;

#define NVML_MEMORY_V2_VERSION ((unsigned int)(sizeof(nvmlMemory_v2_t) | (2u << 24)))

typedef struct {
    unsigned int multiprocessorCount;
    unsigned int sharedCopyEngineCount;
    unsigned int sharedDecoderCount;
    unsigned int sharedEncoderCount;
    unsigned int sharedJpegCount;
    unsigned int sharedOfaCount;
    unsigned int gpuInstanceSliceCount;
    unsigned int computeInstanceSliceCount;
    unsigned long long memorySizeMB;
} nvmlDeviceAttributes_t;

typedef struct fake_device *nvmlDevice_t;
typedef struct fake_event_set *nvmlEventSet_t;

typedef struct {
    nvmlDevice_t device;
    unsigned long long eventType;
    unsigned long long eventData;
    unsigned int gpuInstanceId;
    unsigned int computeInstanceId;
} nvmlEventData_t;

#define EV_SBE 0x1ULL
#define EV_DBE 0x2ULL
#define EV_XID 0x8ULL
#define NO_INSTANCE 0xFFFFFFFFu
#define XID_FALLEN_OFF_BUS 79

/* ---- model ---- */

#define MAX_GPUS 32
#define MAX_MIGS 256
#define MAX_SETS 64
#define MAX_REGS 128
#define TEXT 96

struct fake_device {
    int is_mig;
    int slot; /* index into g_gpus or g_migs */
};

struct gpu {
    struct fake_device dev; /* first member: the handle points here */
    char uuid[TEXT], name[TEXT], serial[TEXT];
    int has_uuid, has_name, has_bus, has_serial;
    unsigned int minor;
    unsigned int domain, bus, device, function;
    unsigned int pci_device_id, pci_subsystem_id;
    unsigned long long mem_total, mem_used, mem_reserved; /* bytes */
    int cc_major, cc_minor;
    int numa_node;
    int mig_capable, mig_current, mig_pending;
    unsigned int max_mig;
    unsigned long long supported_events;
    int nvlink_count;
    int link_peer[NVML_NVLINK_MAX_LINKS]; /* remote GPU index, -1 = not connected */
    unsigned int sm_count;
    int lost;
    int absent; /* not on the bus (present 0, or unplugged) */
    int listed; /* position in g_listed + 1 at the last init; 0 = not listed */
    int nmigs;
    int migs[MAX_MIGS]; /* slots into g_migs, in MIG-index order */
};

struct mig {
    struct fake_device dev;
    int parent;
    unsigned int gi, ci;
    int has_gi, has_ci;
    char uuid[TEXT], name[TEXT], profile[TEXT];
    int has_uuid, has_name, has_profile;
    unsigned long long mem_total, mem_used;
    unsigned int gi_slices, ci_slices, sm_count;
};

struct event {
    int fail; /* 1: a fail-wait marker, matches every set */
    int gpu;
    unsigned long long type, data;
    unsigned int gi, ci;
};

struct registration {
    int gpu;
    unsigned long long mask;
    size_t since; /* first event sequence number this registration can see */
};

struct fake_event_set {
    int in_use;
    size_t cursor; /* next event sequence number to look at */
    int nregs;
    struct registration regs[MAX_REGS];
};

static pthread_mutex_t g_lock = PTHREAD_MUTEX_INITIALIZER;
static int g_refcount;
static char g_driver_version[TEXT], g_nvml_version[TEXT];
static int g_cuda_version;
static int g_ngpus, g_nmigs;
static int g_listed[MAX_GPUS]; /* slots of the GPUs NVML lists, fixed at init */
static int g_nlisted;
static struct gpu g_gpus[MAX_GPUS];
static struct mig g_migs[MAX_MIGS];
static int g_topology[MAX_GPUS][MAX_GPUS]; /* -1 = derive from NUMA nodes */
static struct fake_event_set g_sets[MAX_SETS];

static struct event *g_events;
static size_t g_nevents, g_events_cap;
static char g_ctl_path[4096];
static int g_ctl_fd = -1;
static off_t g_ctl_offset;
static char g_ctl_partial[4096];
static size_t g_ctl_partial_len;
static unsigned long g_ctl_lineno;
static int g_debug; /* NODEDEV_FAKE_NVML_DEBUG, read at init (getenv is not thread-safe) */

/* ---- small helpers ---- */

static void warn(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void warn(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fputs("fake_nvml: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
}

/* Copies with truncation: fixture text longer than NVML's buffers is cut. */
static void copy_text(char *dst, size_t cap, const char *src)
{
    size_t n = strlen(src);
    if (n >= cap)
        n = cap - 1;
    memcpy(dst, src, n);
    dst[n] = '\0';
}

static char *trim(char *s)
{
    while (*s && isspace((unsigned char)*s))
        s++;
    char *end = s + strlen(s);
    while (end > s && isspace((unsigned char)end[-1]))
        *--end = '\0';
    return s;
}

/* Cuts a comment: '#' at line start or after whitespace. */
static void strip_comment(char *s)
{
    for (char *p = s; *p; p++) {
        if (*p == '#' && (p == s || isspace((unsigned char)p[-1]))) {
            *p = '\0';
            return;
        }
    }
}

static int parse_ull(const char *s, unsigned long long *out)
{
    char *end;
    if (!*s)
        return -1;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 0);
    if (errno || *trim(end))
        return -1;
    *out = v;
    return 0;
}

static int parse_int(const char *s, long *out)
{
    char *end;
    if (!*s)
        return -1;
    errno = 0;
    long v = strtol(s, &end, 0);
    if (errno || *trim(end))
        return -1;
    *out = v;
    return 0;
}

/* Accepts "dddddddd:bb:dd.f", "dddd:bb:dd.f" or "bb:dd.f", any case. */
static int parse_bus_id(const char *s, unsigned *dom, unsigned *bus, unsigned *dev, unsigned *fn)
{
    unsigned a, b, c, d;
    char tail;
    if (sscanf(s, "%x:%x:%x.%x%c", &a, &b, &c, &d, &tail) == 4) {
        *dom = a, *bus = b, *dev = c, *fn = d;
        return 0;
    }
    if (sscanf(s, "%x:%x.%x%c", &b, &c, &d, &tail) == 3) {
        *dom = 0, *bus = b, *dev = c, *fn = d;
        return 0;
    }
    return -1;
}

static int level_from_text(const char *s)
{
    static const struct { const char *name; int level; } names[] = {
        {"INTERNAL", 0}, {"SINGLE", 10}, {"MULTIPLE", 20},
        {"HOSTBRIDGE", 30}, {"NODE", 40}, {"CPU", 40}, {"SYSTEM", 50},
    };
    for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++)
        if (strcasecmp(s, names[i].name) == 0)
            return names[i].level;
    long v;
    if (parse_int(s, &v) == 0 && v >= 0 && v <= 50 && v % 10 == 0)
        return (int)v;
    return -1;
}

/* ---- fixture parsing ---- */

struct parser {
    const char *path;
    unsigned long lineno;
    struct gpu *gpu; /* current block, or NULL */
    struct mig *mig;
};

#define PARSE_FAIL(p, ...)                                                   \
    do {                                                                     \
        fprintf(stderr, "fake_nvml: %s:%lu: ", (p)->path, (p)->lineno);     \
        fprintf(stderr, __VA_ARGS__);                                        \
        fputc('\n', stderr);                                                 \
        return -1;                                                           \
    } while (0)

static int gpu_ref(struct parser *p, const char *tok, int *out)
{
    long v;
    if (parse_int(tok, &v) || v < 0 || v >= g_ngpus)
        PARSE_FAIL(p, "'%s' is not the index of a GPU defined above", tok);
    *out = (int)v;
    return 0;
}

static int parse_gpu_key(struct parser *p, const char *key, char *val)
{
    struct gpu *g = p->gpu;
    unsigned long long u;
    long v;
    if (!strcmp(key, "uuid")) {
        copy_text(g->uuid, sizeof g->uuid, val);
        g->has_uuid = 1;
    } else if (!strcmp(key, "name")) {
        copy_text(g->name, sizeof g->name, val);
        g->has_name = 1;
    } else if (!strcmp(key, "serial")) {
        copy_text(g->serial, sizeof g->serial, val);
        g->has_serial = 1;
    } else if (!strcmp(key, "bus_id")) {
        if (parse_bus_id(val, &g->domain, &g->bus, &g->device, &g->function))
            PARSE_FAIL(p, "bad bus_id '%s' (want 00000000:07:00.0)", val);
        g->has_bus = 1;
    } else if (!strcmp(key, "minor")) {
        if (parse_int(val, &v) || v < 0)
            PARSE_FAIL(p, "bad minor '%s'", val);
        g->minor = (unsigned)v;
    } else if (!strcmp(key, "pci_device_id")) {
        if (parse_ull(val, &u) || u > 0xFFFFFFFFULL)
            PARSE_FAIL(p, "bad pci_device_id '%s'", val);
        g->pci_device_id = (unsigned)u;
    } else if (!strcmp(key, "pci_subsystem_id")) {
        if (parse_ull(val, &u) || u > 0xFFFFFFFFULL)
            PARSE_FAIL(p, "bad pci_subsystem_id '%s'", val);
        g->pci_subsystem_id = (unsigned)u;
    } else if (!strcmp(key, "memory_total_mib") || !strcmp(key, "memory_used_mib") ||
               !strcmp(key, "memory_reserved_mib")) {
        if (parse_ull(val, &u))
            PARSE_FAIL(p, "bad %s '%s'", key, val);
        u <<= 20;
        if (key[7] == 't')
            g->mem_total = u;
        else if (key[7] == 'u')
            g->mem_used = u;
        else
            g->mem_reserved = u;
    } else if (!strcmp(key, "compute_capability")) {
        char tail;
        if (sscanf(val, "%d.%d%c", &g->cc_major, &g->cc_minor, &tail) != 2)
            PARSE_FAIL(p, "bad compute_capability '%s' (want 8.0)", val);
    } else if (!strcmp(key, "numa_node")) {
        if (parse_int(val, &v) || v < -1)
            PARSE_FAIL(p, "bad numa_node '%s'", val);
        g->numa_node = (int)v;
    } else if (!strcmp(key, "mig_mode")) {
        int cur, pend;
        char tail;
        if (!strcmp(val, "unsupported")) {
            g->mig_capable = 0;
        } else if (sscanf(val, "%d %d%c", &cur, &pend, &tail) == 2 && (cur == 0 || cur == 1) &&
                   (pend == 0 || pend == 1)) {
            g->mig_capable = 1;
            g->mig_current = cur;
            g->mig_pending = pend;
        } else {
            PARSE_FAIL(p, "bad mig_mode '%s' (want '<current> <pending>' or 'unsupported')", val);
        }
    } else if (!strcmp(key, "max_mig_devices")) {
        if (parse_int(val, &v) || v < 0 || v > MAX_MIGS)
            PARSE_FAIL(p, "bad max_mig_devices '%s'", val);
        g->max_mig = (unsigned)v;
    } else if (!strcmp(key, "supported_events")) {
        if (parse_ull(val, &u))
            PARSE_FAIL(p, "bad supported_events '%s'", val);
        g->supported_events = u;
    } else if (!strcmp(key, "nvlink_count")) {
        if (parse_int(val, &v) || v < 0 || v > NVML_NVLINK_MAX_LINKS)
            PARSE_FAIL(p, "bad nvlink_count '%s' (0..%d)", val, NVML_NVLINK_MAX_LINKS);
        g->nvlink_count = (int)v;
    } else if (!strcmp(key, "multiprocessor_count")) {
        if (parse_int(val, &v) || v < 0)
            PARSE_FAIL(p, "bad multiprocessor_count '%s'", val);
        g->sm_count = (unsigned)v;
    } else if (!strcmp(key, "present")) {
        if (parse_int(val, &v) || (v != 0 && v != 1))
            PARSE_FAIL(p, "bad present '%s' (0 or 1)", val);
        g->absent = !v;
    } else {
        PARSE_FAIL(p, "unknown GPU key '%s'", key);
    }
    return 0;
}

static int parse_mig_key(struct parser *p, const char *key, char *val)
{
    struct mig *m = p->mig;
    unsigned long long u;
    long v;
    if (!strcmp(key, "uuid")) {
        copy_text(m->uuid, sizeof m->uuid, val);
        m->has_uuid = 1;
    } else if (!strcmp(key, "name")) {
        copy_text(m->name, sizeof m->name, val);
        m->has_name = 1;
    } else if (!strcmp(key, "profile")) {
        copy_text(m->profile, sizeof m->profile, val);
        m->has_profile = 1;
    } else if (!strcmp(key, "gpu_instance_id") || !strcmp(key, "compute_instance_id")) {
        if (parse_int(val, &v) || v < 0)
            PARSE_FAIL(p, "bad %s '%s'", key, val);
        if (key[0] == 'g')
            m->gi = (unsigned)v, m->has_gi = 1;
        else
            m->ci = (unsigned)v, m->has_ci = 1;
    } else if (!strcmp(key, "memory_total_mib") || !strcmp(key, "memory_used_mib")) {
        if (parse_ull(val, &u))
            PARSE_FAIL(p, "bad %s '%s'", key, val);
        if (key[7] == 't')
            m->mem_total = u << 20;
        else
            m->mem_used = u << 20;
    } else if (!strcmp(key, "gpu_slices") || !strcmp(key, "compute_slices") ||
               !strcmp(key, "multiprocessor_count")) {
        if (parse_int(val, &v) || v < 0)
            PARSE_FAIL(p, "bad %s '%s'", key, val);
        if (key[0] == 'g')
            m->gi_slices = (unsigned)v;
        else if (key[0] == 'c')
            m->ci_slices = (unsigned)v;
        else
            m->sm_count = (unsigned)v;
    } else {
        PARSE_FAIL(p, "unknown MIG key '%s'", key);
    }
    return 0;
}

static int close_block(struct parser *p)
{
    if (p->gpu) {
        struct gpu *g = p->gpu;
        if (!g->has_uuid || !g->has_name || !g->has_bus)
            PARSE_FAIL(p, "GPU %d (block ending here) needs uuid, name and bus_id", g->dev.slot);
    }
    if (p->mig) {
        struct mig *m = p->mig;
        if (!m->has_uuid || !m->has_profile || !m->has_gi || !m->has_ci)
            PARSE_FAIL(p, "MIG device under GPU %d (block ending here) needs uuid, profile, "
                          "gpu_instance_id and compute_instance_id", m->parent);
        if (!m->has_name) {
            char full[2 * TEXT + 8];
            snprintf(full, sizeof full, "%s MIG %s", g_gpus[m->parent].name, m->profile);
            copy_text(m->name, sizeof m->name, full);
        }
    }
    p->gpu = NULL;
    p->mig = NULL;
    return 0;
}

static int parse_top_key(struct parser *p, const char *key, char *val, int *handled)
{
    long v;
    *handled = 1;
    if (!strcmp(key, "driver_version")) {
        copy_text(g_driver_version, sizeof g_driver_version, val);
    } else if (!strcmp(key, "nvml_version")) {
        copy_text(g_nvml_version, sizeof g_nvml_version, val);
    } else if (!strcmp(key, "cuda_driver_version")) {
        if (parse_int(val, &v))
            PARSE_FAIL(p, "bad cuda_driver_version '%s'", val);
        g_cuda_version = (int)v;
    } else if (!strcmp(key, "init_error")) {
        /* handled before parsing; nothing to store */
    } else if (!strcmp(key, "gpu")) {
        if (parse_int(val, &v) || v != g_ngpus)
            PARSE_FAIL(p, "expected 'gpu %d' (GPU indices are dense and in order)", g_ngpus);
        if (g_ngpus == MAX_GPUS)
            PARSE_FAIL(p, "at most %d GPUs", MAX_GPUS);
        struct gpu *g = &g_gpus[g_ngpus];
        memset(g, 0, sizeof *g);
        g->dev.is_mig = 0;
        g->dev.slot = g_ngpus;
        g->minor = (unsigned)g_ngpus;
        g->numa_node = -1;
        g->max_mig = 7;
        g->supported_events = 0x1F;
        for (int i = 0; i < NVML_NVLINK_MAX_LINKS; i++)
            g->link_peer[i] = -1;
        g_ngpus++;
        p->gpu = g;
    } else if (!strcmp(key, "mig")) {
        int parent;
        if (gpu_ref(p, val, &parent))
            return -1;
        struct gpu *g = &g_gpus[parent];
        if (!g->mig_capable || g->mig_current != 1)
            PARSE_FAIL(p, "GPU %d has MIG disabled (mig_mode), it can have no MIG devices", parent);
        if (g_nmigs == MAX_MIGS)
            PARSE_FAIL(p, "at most %d MIG devices", MAX_MIGS);
        struct mig *m = &g_migs[g_nmigs];
        memset(m, 0, sizeof *m);
        m->dev.is_mig = 1;
        m->dev.slot = g_nmigs;
        m->parent = parent;
        g->migs[g->nmigs++] = g_nmigs;
        g_nmigs++;
        p->mig = m;
    } else if (!strcmp(key, "nvlink")) {
        char a[32], b[32], n[32], tail;
        int ga, gb;
        long count;
        if (sscanf(val, "%31s %31s %31s %c", a, b, n, &tail) != 3)
            PARSE_FAIL(p, "want 'nvlink <gpuA> <gpuB> <links>'");
        if (gpu_ref(p, a, &ga) || gpu_ref(p, b, &gb))
            return -1;
        if (ga == gb || parse_int(n, &count) || count < 1)
            PARSE_FAIL(p, "bad nvlink '%s'", val);
        for (long i = 0; i < count; i++) {
            int la = -1, lb = -1;
            for (int l = 0; l < g_gpus[ga].nvlink_count && la < 0; l++)
                if (g_gpus[ga].link_peer[l] < 0)
                    la = l;
            for (int l = 0; l < g_gpus[gb].nvlink_count && lb < 0; l++)
                if (g_gpus[gb].link_peer[l] < 0)
                    lb = l;
            if (la < 0 || lb < 0)
                PARSE_FAIL(p, "GPU %d has no free NVLink left (raise its nvlink_count)", la < 0 ? ga : gb);
            g_gpus[ga].link_peer[la] = gb;
            g_gpus[gb].link_peer[lb] = ga;
        }
    } else if (!strcmp(key, "topology")) {
        char a[32], b[32], lv[32], tail;
        int ga, gb, level;
        if (sscanf(val, "%31s %31s %31s %c", a, b, lv, &tail) != 3)
            PARSE_FAIL(p, "want 'topology <gpuA> <gpuB> <LEVEL>'");
        if (gpu_ref(p, a, &ga) || gpu_ref(p, b, &gb))
            return -1;
        if ((level = level_from_text(lv)) < 0)
            PARSE_FAIL(p, "bad topology level '%s'", lv);
        g_topology[ga][gb] = g_topology[gb][ga] = level;
    } else {
        *handled = 0;
    }
    return 0;
}

static void reset_model(void)
{
    g_ngpus = g_nmigs = 0;
    copy_text(g_driver_version, sizeof g_driver_version, "550.54.15");
    copy_text(g_nvml_version, sizeof g_nvml_version, "12.550.54.15");
    g_cuda_version = 12040;
    for (int i = 0; i < MAX_GPUS; i++)
        for (int j = 0; j < MAX_GPUS; j++)
            g_topology[i][j] = -1;
}

/* Returns NVML_SUCCESS, or the code nvmlInit should fail with. */
static nvmlReturn_t load_fixture(const char *path)
{
    reset_model();
    FILE *f = fopen(path, "r");
    if (!f) {
        warn("cannot open fixture %s (NODEDEV_FAKE_NVML): %s", path, strerror(errno));
        return NVML_ERROR_DRIVER_NOT_LOADED;
    }
    struct parser p = {.path = path};
    char line[1024];
    nvmlReturn_t init_error = NVML_SUCCESS;
    int failed = 0;
    while (!failed && fgets(line, sizeof line, f)) {
        p.lineno++;
        strip_comment(line);
        char *s = trim(line);
        if (!*s)
            continue;
        char *val = s;
        while (*val && !isspace((unsigned char)*val))
            val++;
        if (*val)
            *val++ = '\0';
        val = trim(val);
        int handled;
        const char *key = s;
        int is_block_start = !strcmp(key, "gpu") || !strcmp(key, "mig") ||
                             !strcmp(key, "nvlink") || !strcmp(key, "topology");
        int is_top = is_block_start || !strcmp(key, "driver_version") ||
                     !strcmp(key, "nvml_version") || !strcmp(key, "cuda_driver_version") ||
                     !strcmp(key, "init_error");
        if (is_top) {
            if (close_block(&p)) {
                failed = 1;
                break;
            }
            if (!strcmp(key, "init_error")) {
                long v;
                if (parse_int(val, &v) || v <= 0) {
                    fprintf(stderr, "fake_nvml: %s:%lu: bad init_error '%s'\n", path, p.lineno, val);
                    failed = 1;
                    break;
                }
                init_error = (nvmlReturn_t)v;
            }
            if (parse_top_key(&p, key, val, &handled))
                failed = 1;
        } else if (p.gpu) {
            failed = parse_gpu_key(&p, key, val) != 0;
        } else if (p.mig) {
            failed = parse_mig_key(&p, key, val) != 0;
        } else {
            fprintf(stderr, "fake_nvml: %s:%lu: unknown key '%s' outside a gpu/mig block\n", path,
                    p.lineno, key);
            failed = 1;
        }
    }
    fclose(f);
    if (!failed && close_block(&p))
        failed = 1;
    if (failed) {
        reset_model();
        return NVML_ERROR_UNKNOWN;
    }
    if (init_error != NVML_SUCCESS) {
        reset_model();
        return init_error;
    }
    return NVML_SUCCESS;
}

/* ---- control file (runtime injection) ---- */

static void push_event(struct event ev)
{
    if (g_nevents == g_events_cap) {
        size_t cap = g_events_cap ? g_events_cap * 2 : 64;
        struct event *grown = realloc(g_events, cap * sizeof *grown);
        if (!grown) {
            warn("out of memory queueing an event; dropped");
            return;
        }
        g_events = grown;
        g_events_cap = cap;
    }
    g_events[g_nevents++] = ev;
}

static int ctl_gpu(const char *tok, int *out)
{
    long v;
    if (!tok || parse_int(tok, &v) || v < 0 || v >= g_ngpus)
        return -1;
    *out = (int)v;
    return 0;
}

static void ctl_line(char *line)
{
    unsigned long lineno = ++g_ctl_lineno;
    strip_comment(line);
    char *s = trim(line);
    if (!*s)
        return;
    if (g_debug)
        warn("control: %s", s);
    char *tok[8] = {0};
    int n = 0;
    char *save = NULL;
    for (char *t = strtok_r(s, " \t", &save); t && n < 8; t = strtok_r(NULL, " \t", &save))
        tok[n++] = t;
    struct event ev = {.gi = NO_INSTANCE, .ci = NO_INSTANCE};
    const char *cmd = tok[0];
    if (!strcmp(cmd, "xid") && (n == 3 || n == 5)) {
        if (ctl_gpu(tok[1], &ev.gpu) || parse_ull(tok[2], &ev.data))
            goto bad;
        ev.type = EV_XID;
        if (n == 5) {
            unsigned long long gi, ci;
            if (parse_ull(tok[3], &gi) || parse_ull(tok[4], &ci))
                goto bad;
            ev.gi = (unsigned)gi, ev.ci = (unsigned)ci;
        }
        push_event(ev);
    } else if (!strcmp(cmd, "ecc") && n == 3) {
        if (ctl_gpu(tok[1], &ev.gpu))
            goto bad;
        if (!strcmp(tok[2], "sbe"))
            ev.type = EV_SBE;
        else if (!strcmp(tok[2], "dbe"))
            ev.type = EV_DBE;
        else
            goto bad;
        push_event(ev);
    } else if (!strcmp(cmd, "event") && (n == 4 || n == 6)) {
        if (ctl_gpu(tok[1], &ev.gpu) || parse_ull(tok[2], &ev.type) || parse_ull(tok[3], &ev.data))
            goto bad;
        if (n == 6) {
            unsigned long long gi, ci;
            if (parse_ull(tok[4], &gi) || parse_ull(tok[5], &ci))
                goto bad;
            ev.gi = (unsigned)gi, ev.ci = (unsigned)ci;
        }
        push_event(ev);
    } else if (!strcmp(cmd, "lost") && n == 2) {
        if (ctl_gpu(tok[1], &ev.gpu))
            goto bad;
        g_gpus[ev.gpu].lost = 1;
        ev.type = EV_XID;
        ev.data = XID_FALLEN_OFF_BUS;
        push_event(ev);
    } else if (!strcmp(cmd, "recover") && n == 2) {
        if (ctl_gpu(tok[1], &ev.gpu))
            goto bad;
        g_gpus[ev.gpu].lost = 0;
    } else if (!strcmp(cmd, "unplug") && n == 2) {
        if (ctl_gpu(tok[1], &ev.gpu))
            goto bad;
        g_gpus[ev.gpu].absent = 1;
        ev.type = EV_XID;
        ev.data = XID_FALLEN_OFF_BUS;
        push_event(ev);
    } else if (!strcmp(cmd, "plug") && n == 2) {
        if (ctl_gpu(tok[1], &ev.gpu))
            goto bad;
        g_gpus[ev.gpu].absent = 0;
    } else if (!strcmp(cmd, "fail-wait")) {
        ev.fail = 1;
        ev.gpu = -1;
        push_event(ev);
    } else {
        goto bad;
    }
    return;
bad:
    warn("%s:%lu: ignoring bad control line (first word '%s'); see fake_nvml.c for the syntax",
         g_ctl_path, lineno, cmd);
}

/* Reads complete new lines of the control file. Called with g_lock held. */
static void ingest_control(void)
{
    if (!g_ctl_path[0])
        return;
    if (g_ctl_fd < 0) {
        g_ctl_fd = open(g_ctl_path, O_RDONLY | O_CLOEXEC);
        if (g_ctl_fd < 0)
            return; /* not created yet */
        g_ctl_offset = 0;
        g_ctl_partial_len = 0;
    }
    struct stat st;
    if (fstat(g_ctl_fd, &st) == 0 && st.st_size < g_ctl_offset) {
        /* truncated and rewritten: start over */
        g_ctl_offset = 0;
        g_ctl_partial_len = 0;
    }
    for (;;) {
        char buf[4096];
        ssize_t got = pread(g_ctl_fd, buf, sizeof buf, g_ctl_offset);
        if (got <= 0)
            return;
        g_ctl_offset += got;
        for (ssize_t i = 0; i < got; i++) {
            if (buf[i] == '\n') {
                g_ctl_partial[g_ctl_partial_len] = '\0';
                ctl_line(g_ctl_partial);
                g_ctl_partial_len = 0;
            } else if (g_ctl_partial_len < sizeof g_ctl_partial - 1) {
                g_ctl_partial[g_ctl_partial_len++] = buf[i];
            }
        }
    }
}

static void reset_runtime(void)
{
    if (g_ctl_fd >= 0)
        close(g_ctl_fd);
    g_ctl_fd = -1;
    g_ctl_offset = 0;
    g_ctl_partial_len = 0;
    g_ctl_lineno = 0;
    free(g_events);
    g_events = NULL;
    g_nevents = g_events_cap = 0;
    memset(g_sets, 0, sizeof g_sets);
    const char *debug = getenv("NODEDEV_FAKE_NVML_DEBUG");
    g_debug = debug && *debug;
    const char *ctl = getenv("NODEDEV_FAKE_NVML_EVENTS");
    copy_text(g_ctl_path, sizeof g_ctl_path, ctl ? ctl : "");
}

/* ---- handle resolution ---- */

/* Every entry point takes the lock, checks init and ingests new control lines. */
#define ENTER()                                      \
    pthread_mutex_lock(&g_lock);                     \
    if (g_refcount == 0) {                           \
        pthread_mutex_unlock(&g_lock);               \
        return NVML_ERROR_UNINITIALIZED;             \
    }                                                \
    ingest_control()

#define LEAVE(rc)                                    \
    do {                                             \
        nvmlReturn_t rc_ = (rc);                     \
        pthread_mutex_unlock(&g_lock);               \
        return rc_;                                  \
    } while (0)

static struct gpu *as_gpu(nvmlDevice_t h)
{
    char *p = (char *)h, *base = (char *)g_gpus;
    if (!h || p < base || p >= (char *)(g_gpus + g_ngpus) || (size_t)(p - base) % sizeof(struct gpu))
        return NULL;
    return (struct gpu *)h;
}

static struct mig *as_mig(nvmlDevice_t h)
{
    char *p = (char *)h, *base = (char *)g_migs;
    if (!h || p < base || p >= (char *)(g_migs + g_nmigs) || (size_t)(p - base) % sizeof(struct mig))
        return NULL;
    return (struct mig *)h;
}

/* Resolves any handle: sets *gpu (the GPU or the MIG device's parent) and *mig
 * (NULL for a full GPU). Returns INVALID_ARGUMENT or GPU_IS_LOST on failure. */
static nvmlReturn_t resolve(nvmlDevice_t h, struct gpu **gpu, struct mig **mig)
{
    struct gpu *g = as_gpu(h);
    struct mig *m = g ? NULL : as_mig(h);
    if (m)
        g = &g_gpus[m->parent];
    if (!g || !g->listed)
        return NVML_ERROR_INVALID_ARGUMENT;
    if (g->lost || g->absent)
        return NVML_ERROR_GPU_IS_LOST;
    *gpu = g;
    if (mig)
        *mig = m;
    return NVML_SUCCESS;
}

/* Like resolve() but only full GPU handles; MIG handles give `mig_rc`. */
static nvmlReturn_t resolve_gpu(nvmlDevice_t h, struct gpu **gpu, nvmlReturn_t mig_rc)
{
    struct mig *m = NULL;
    nvmlReturn_t rc = resolve(h, gpu, &m);
    if (rc == NVML_SUCCESS && m)
        return mig_rc;
    return rc;
}

static void bus_ids(const struct gpu *g, char *legacy, size_t lcap, char *full, size_t fcap)
{
    snprintf(legacy, lcap, "%04X:%02X:%02X.%X", g->domain & 0xFFFF, g->bus, g->device, g->function);
    snprintf(full, fcap, "%08X:%02X:%02X.%X", g->domain, g->bus, g->device, g->function);
}

static void fill_pci(const struct gpu *g, nvmlPciInfo_t *pci)
{
    memset(pci, 0, sizeof *pci);
    bus_ids(g, pci->busIdLegacy, sizeof pci->busIdLegacy, pci->busId, sizeof pci->busId);
    pci->domain = g->domain;
    pci->bus = g->bus;
    pci->device = g->device;
    pci->pciDeviceId = g->pci_device_id;
    pci->pciSubSystemId = g->pci_subsystem_id;
}

static nvmlReturn_t put_text(char *buf, unsigned int len, const char *text)
{
    if (!buf)
        return NVML_ERROR_INVALID_ARGUMENT;
    if (strlen(text) + 1 > len)
        return NVML_ERROR_INSUFFICIENT_SIZE;
    memcpy(buf, text, strlen(text) + 1);
    return NVML_SUCCESS;
}

/* ---- init / system ---- */

/* What NVML lists until the next init: the GPUs on the bus now, in fixture order. */
static void list_gpus(void)
{
    g_nlisted = 0;
    for (int i = 0; i < g_ngpus; i++) {
        g_gpus[i].listed = 0;
        if (!g_gpus[i].absent) {
            g_listed[g_nlisted++] = i;
            g_gpus[i].listed = g_nlisted;
        }
    }
}

EXPORT nvmlReturn_t nvmlInitWithFlags(unsigned int flags)
{
    (void)flags;
    pthread_mutex_lock(&g_lock);
    if (g_refcount > 0) {
        g_refcount++;
        LEAVE(NVML_SUCCESS);
    }
    const char *path = getenv("NODEDEV_FAKE_NVML");
    if (!path || !*path) {
        warn("NODEDEV_FAKE_NVML is not set: no fixture, behaving as if no driver is loaded");
        LEAVE(NVML_ERROR_DRIVER_NOT_LOADED);
    }
    nvmlReturn_t rc = load_fixture(path);
    if (rc != NVML_SUCCESS)
        LEAVE(rc);
    reset_runtime();
    g_refcount = 1;
    ingest_control();
    list_gpus();
    LEAVE(NVML_SUCCESS);
}

EXPORT nvmlReturn_t nvmlInit_v2(void) { return nvmlInitWithFlags(0); }
EXPORT nvmlReturn_t nvmlInit(void) { return nvmlInitWithFlags(0); }

EXPORT nvmlReturn_t nvmlShutdown(void)
{
    pthread_mutex_lock(&g_lock);
    if (g_refcount == 0)
        LEAVE(NVML_ERROR_UNINITIALIZED);
    g_refcount--;
    LEAVE(NVML_SUCCESS);
}

EXPORT const char *nvmlErrorString(nvmlReturn_t result)
{
    switch (result) {
    case 0: return "Success";
    case 1: return "Uninitialized";
    case 2: return "Invalid Argument";
    case 3: return "Not Supported";
    case 4: return "Insufficient Permissions";
    case 5: return "Already Initialized";
    case 6: return "Not Found";
    case 7: return "Insufficient Size";
    case 8: return "Insufficient External Power";
    case 9: return "Driver Not Loaded";
    case 10: return "Timeout";
    case 11: return "Interrupt Request Issue";
    case 12: return "NVML Shared Library Not Found";
    case 13: return "Function Not Found";
    case 14: return "Corrupted infoROM";
    case 15: return "GPU is lost";
    case 16: return "GPU requires restart";
    case 17: return "The operating system has blocked the request.";
    case 18: return "RM has detected an NVML/RM version mismatch.";
    case 19: return "In use by another client";
    case 20: return "Insufficient Memory";
    case 21: return "No data";
    case 25: return "Argument version mismatch";
    case 26: return "Deprecated";
    case 27: return "Not Ready";
    case 28: return "GPU not found";
    case 29: return "Invalid state";
    default: return "Unknown Error";
    }
}

EXPORT nvmlReturn_t nvmlSystemGetDriverVersion(char *version, unsigned int length)
{
    ENTER();
    LEAVE(put_text(version, length, g_driver_version));
}

EXPORT nvmlReturn_t nvmlSystemGetNVMLVersion(char *version, unsigned int length)
{
    ENTER();
    LEAVE(put_text(version, length, g_nvml_version));
}

EXPORT nvmlReturn_t nvmlSystemGetCudaDriverVersion(int *version)
{
    ENTER();
    if (!version)
        LEAVE(NVML_ERROR_INVALID_ARGUMENT);
    *version = g_cuda_version;
    LEAVE(NVML_SUCCESS);
}

EXPORT nvmlReturn_t nvmlSystemGetCudaDriverVersion_v2(int *version)
{
    return nvmlSystemGetCudaDriverVersion(version);
}

/* ---- device discovery ---- */

EXPORT nvmlReturn_t nvmlDeviceGetCount_v2(unsigned int *count)
{
    ENTER();
    if (!count)
        LEAVE(NVML_ERROR_INVALID_ARGUMENT);
    *count = (unsigned)g_nlisted;
    LEAVE(NVML_SUCCESS);
}

EXPORT nvmlReturn_t nvmlDeviceGetCount(unsigned int *count) { return nvmlDeviceGetCount_v2(count); }

EXPORT nvmlReturn_t nvmlDeviceGetHandleByIndex_v2(unsigned int index, nvmlDevice_t *device)
{
    ENTER();
    if (!device || index >= (unsigned)g_nlisted)
        LEAVE(NVML_ERROR_INVALID_ARGUMENT);
    struct gpu *g = &g_gpus[g_listed[index]];
    if (g->lost || g->absent)
        LEAVE(NVML_ERROR_GPU_IS_LOST);
    *device = &g->dev;
    LEAVE(NVML_SUCCESS);
}

EXPORT nvmlReturn_t nvmlDeviceGetHandleByIndex(unsigned int index, nvmlDevice_t *device)
{
    return nvmlDeviceGetHandleByIndex_v2(index, device);
}

EXPORT nvmlReturn_t nvmlDeviceGetHandleByUUID(const char *uuid, nvmlDevice_t *device)
{
    ENTER();
    if (!uuid || !device)
        LEAVE(NVML_ERROR_INVALID_ARGUMENT);
    for (int i = 0; i < g_ngpus; i++) {
        if (g_gpus[i].listed && !strcmp(g_gpus[i].uuid, uuid)) {
            if (g_gpus[i].lost || g_gpus[i].absent)
                LEAVE(NVML_ERROR_GPU_IS_LOST);
            *device = &g_gpus[i].dev;
            LEAVE(NVML_SUCCESS);
        }
    }
    for (int i = 0; i < g_nmigs; i++) {
        const struct gpu *parent = &g_gpus[g_migs[i].parent];
        if (parent->listed && !strcmp(g_migs[i].uuid, uuid)) {
            if (parent->lost || parent->absent)
                LEAVE(NVML_ERROR_GPU_IS_LOST);
            *device = &g_migs[i].dev;
            LEAVE(NVML_SUCCESS);
        }
    }
    LEAVE(NVML_ERROR_NOT_FOUND);
}

EXPORT nvmlReturn_t nvmlDeviceGetHandleByPciBusId_v2(const char *pciBusId, nvmlDevice_t *device)
{
    unsigned dom, bus, dev, fn;
    ENTER();
    if (!pciBusId || !device || parse_bus_id(pciBusId, &dom, &bus, &dev, &fn))
        LEAVE(NVML_ERROR_INVALID_ARGUMENT);
    for (int i = 0; i < g_ngpus; i++) {
        struct gpu *g = &g_gpus[i];
        if (g->listed && g->domain == dom && g->bus == bus && g->device == dev && g->function == fn) {
            if (g->lost || g->absent)
                LEAVE(NVML_ERROR_GPU_IS_LOST);
            *device = &g->dev;
            LEAVE(NVML_SUCCESS);
        }
    }
    LEAVE(NVML_ERROR_NOT_FOUND);
}

EXPORT nvmlReturn_t nvmlDeviceGetHandleByPciBusId(const char *pciBusId, nvmlDevice_t *device)
{
    return nvmlDeviceGetHandleByPciBusId_v2(pciBusId, device);
}

EXPORT nvmlReturn_t nvmlDeviceGetUUID(nvmlDevice_t device, char *uuid, unsigned int length)
{
    struct gpu *g;
    struct mig *m;
    ENTER();
    nvmlReturn_t rc = resolve(device, &g, &m);
    if (rc)
        LEAVE(rc);
    LEAVE(put_text(uuid, length, m ? m->uuid : g->uuid));
}

EXPORT nvmlReturn_t nvmlDeviceGetName(nvmlDevice_t device, char *name, unsigned int length)
{
    struct gpu *g;
    struct mig *m;
    ENTER();
    nvmlReturn_t rc = resolve(device, &g, &m);
    if (rc)
        LEAVE(rc);
    LEAVE(put_text(name, length, m ? m->name : g->name));
}

EXPORT nvmlReturn_t nvmlDeviceGetSerial(nvmlDevice_t device, char *serial, unsigned int length)
{
    struct gpu *g;
    struct mig *m;
    ENTER();
    nvmlReturn_t rc = resolve(device, &g, &m);
    if (rc)
        LEAVE(rc);
    if (!g->has_serial)
        LEAVE(NVML_ERROR_NOT_SUPPORTED);
    LEAVE(put_text(serial, length, g->serial));
}

EXPORT nvmlReturn_t nvmlDeviceGetIndex(nvmlDevice_t device, unsigned int *index)
{
    struct gpu *g;
    ENTER();
    nvmlReturn_t rc = resolve_gpu(device, &g, NVML_ERROR_INVALID_ARGUMENT);
    if (rc)
        LEAVE(rc);
    if (!index)
        LEAVE(NVML_ERROR_INVALID_ARGUMENT);
    *index = (unsigned)(g->listed - 1);
    LEAVE(NVML_SUCCESS);
}

EXPORT nvmlReturn_t nvmlDeviceGetMinorNumber(nvmlDevice_t device, unsigned int *minor)
{
    struct gpu *g;
    ENTER();
    nvmlReturn_t rc = resolve_gpu(device, &g, NVML_ERROR_INVALID_ARGUMENT);
    if (rc)
        LEAVE(rc);
    if (!minor)
        LEAVE(NVML_ERROR_INVALID_ARGUMENT);
    *minor = g->minor;
    LEAVE(NVML_SUCCESS);
}

/* A MIG handle reports its parent's PCI info, as real NVML does. */
EXPORT nvmlReturn_t nvmlDeviceGetPciInfo_v3(nvmlDevice_t device, nvmlPciInfo_t *pci)
{
    struct gpu *g;
    ENTER();
    nvmlReturn_t rc = resolve(device, &g, NULL);
    if (rc)
        LEAVE(rc);
    if (!pci)
        LEAVE(NVML_ERROR_INVALID_ARGUMENT);
    fill_pci(g, pci);
    LEAVE(NVML_SUCCESS);
}

EXPORT nvmlReturn_t nvmlDeviceGetPciInfo_v2(nvmlDevice_t device, nvmlPciInfo_t *pci)
{
    return nvmlDeviceGetPciInfo_v3(device, pci);
}

EXPORT nvmlReturn_t nvmlDeviceGetPciInfo(nvmlDevice_t device, nvmlPciInfo_t *pci)
{
    return nvmlDeviceGetPciInfo_v3(device, pci);
}

static void memory_of(const struct gpu *g, const struct mig *m, unsigned long long *total,
                      unsigned long long *reserved, unsigned long long *used)
{
    if (m) {
        *total = m->mem_total, *reserved = 0, *used = m->mem_used;
    } else {
        *total = g->mem_total, *reserved = g->mem_reserved, *used = g->mem_used;
    }
}

EXPORT nvmlReturn_t nvmlDeviceGetMemoryInfo(nvmlDevice_t device, nvmlMemory_t *memory)
{
    struct gpu *g;
    struct mig *m;
    unsigned long long total, reserved, used;
    ENTER();
    nvmlReturn_t rc = resolve(device, &g, &m);
    if (rc)
        LEAVE(rc);
    if (!memory)
        LEAVE(NVML_ERROR_INVALID_ARGUMENT);
    memory_of(g, m, &total, &reserved, &used);
    /* v1 folds the driver-reserved memory into "used" */
    memory->total = total;
    memory->used = used + reserved;
    memory->free = total > used + reserved ? total - used - reserved : 0;
    LEAVE(NVML_SUCCESS);
}

EXPORT nvmlReturn_t nvmlDeviceGetMemoryInfo_v2(nvmlDevice_t device, nvmlMemory_v2_t *memory)
{
    struct gpu *g;
    struct mig *m;
    unsigned long long total, reserved, used;
    ENTER();
    nvmlReturn_t rc = resolve(device, &g, &m);
    if (rc)
        LEAVE(rc);
    if (!memory)
        LEAVE(NVML_ERROR_INVALID_ARGUMENT);
    if (memory->version != NVML_MEMORY_V2_VERSION)
        LEAVE(NVML_ERROR_ARGUMENT_VERSION_MISMATCH);
    memory_of(g, m, &total, &reserved, &used);
    memory->total = total;
    memory->reserved = reserved;
    memory->used = used;
    memory->free = total > used + reserved ? total - used - reserved : 0;
    LEAVE(NVML_SUCCESS);
}

EXPORT nvmlReturn_t nvmlDeviceGetCudaComputeCapability(nvmlDevice_t device, int *major, int *minor)
{
    struct gpu *g;
    ENTER();
    nvmlReturn_t rc = resolve(device, &g, NULL);
    if (rc)
        LEAVE(rc);
    if (!major || !minor)
        LEAVE(NVML_ERROR_INVALID_ARGUMENT);
    *major = g->cc_major;
    *minor = g->cc_minor;
    LEAVE(NVML_SUCCESS);
}

EXPORT nvmlReturn_t nvmlDeviceGetNumaNodeId(nvmlDevice_t device, unsigned int *node)
{
    struct gpu *g;
    ENTER();
    nvmlReturn_t rc = resolve(device, &g, NULL);
    if (rc)
        LEAVE(rc);
    if (!node)
        LEAVE(NVML_ERROR_INVALID_ARGUMENT);
    if (g->numa_node < 0)
        LEAVE(NVML_ERROR_NOT_SUPPORTED);
    *node = (unsigned)g->numa_node;
    LEAVE(NVML_SUCCESS);
}

EXPORT nvmlReturn_t nvmlDeviceGetAttributes_v2(nvmlDevice_t device, nvmlDeviceAttributes_t *attr)
{
    struct gpu *g;
    struct mig *m;
    ENTER();
    nvmlReturn_t rc = resolve(device, &g, &m);
    if (rc)
        LEAVE(rc);
    if (!attr)
        LEAVE(NVML_ERROR_INVALID_ARGUMENT);
    memset(attr, 0, sizeof *attr);
    if (m) {
        attr->multiprocessorCount = m->sm_count;
        attr->gpuInstanceSliceCount = m->gi_slices;
        attr->computeInstanceSliceCount = m->ci_slices;
        attr->memorySizeMB = m->mem_total >> 20;
    } else {
        attr->multiprocessorCount = g->sm_count;
        attr->memorySizeMB = g->mem_total >> 20;
    }
    LEAVE(NVML_SUCCESS);
}

EXPORT nvmlReturn_t nvmlDeviceGetAttributes(nvmlDevice_t device, nvmlDeviceAttributes_t *attr)
{
    return nvmlDeviceGetAttributes_v2(device, attr);
}

/* ---- MIG ---- */

EXPORT nvmlReturn_t nvmlDeviceGetMigMode(nvmlDevice_t device, unsigned int *current, unsigned int *pending)
{
    struct gpu *g;
    ENTER();
    nvmlReturn_t rc = resolve_gpu(device, &g, NVML_ERROR_NOT_SUPPORTED);
    if (rc)
        LEAVE(rc);
    if (!current || !pending)
        LEAVE(NVML_ERROR_INVALID_ARGUMENT);
    if (!g->mig_capable)
        LEAVE(NVML_ERROR_NOT_SUPPORTED);
    *current = (unsigned)g->mig_current;
    *pending = (unsigned)g->mig_pending;
    LEAVE(NVML_SUCCESS);
}

/* 0 while MIG is unsupported or disabled, as documented for real NVML. */
EXPORT nvmlReturn_t nvmlDeviceGetMaxMigDeviceCount(nvmlDevice_t device, unsigned int *count)
{
    struct gpu *g;
    ENTER();
    nvmlReturn_t rc = resolve_gpu(device, &g, NVML_ERROR_INVALID_ARGUMENT);
    if (rc)
        LEAVE(rc);
    if (!count)
        LEAVE(NVML_ERROR_INVALID_ARGUMENT);
    *count = (g->mig_capable && g->mig_current) ? g->max_mig : 0;
    LEAVE(NVML_SUCCESS);
}

EXPORT nvmlReturn_t nvmlDeviceGetMigDeviceHandleByIndex(nvmlDevice_t device, unsigned int index,
                                                        nvmlDevice_t *migDevice)
{
    struct gpu *g;
    ENTER();
    nvmlReturn_t rc = resolve_gpu(device, &g, NVML_ERROR_INVALID_ARGUMENT);
    if (rc)
        LEAVE(rc);
    if (!migDevice)
        LEAVE(NVML_ERROR_INVALID_ARGUMENT);
    if (!g->mig_capable)
        LEAVE(NVML_ERROR_NOT_SUPPORTED);
    if (!g->mig_current || index >= g->max_mig)
        LEAVE(NVML_ERROR_INVALID_ARGUMENT);
    if (index >= (unsigned)g->nmigs)
        LEAVE(NVML_ERROR_NOT_FOUND);
    *migDevice = &g_migs[g->migs[index]].dev;
    LEAVE(NVML_SUCCESS);
}

EXPORT nvmlReturn_t nvmlDeviceGetDeviceHandleFromMigDeviceHandle(nvmlDevice_t migDevice, nvmlDevice_t *device)
{
    struct gpu *g;
    struct mig *m;
    ENTER();
    nvmlReturn_t rc = resolve(migDevice, &g, &m);
    if (rc)
        LEAVE(rc);
    if (!m || !device)
        LEAVE(NVML_ERROR_INVALID_ARGUMENT);
    *device = &g->dev;
    LEAVE(NVML_SUCCESS);
}

EXPORT nvmlReturn_t nvmlDeviceIsMigDeviceHandle(nvmlDevice_t device, unsigned int *isMigDevice)
{
    struct gpu *g;
    struct mig *m;
    ENTER();
    nvmlReturn_t rc = resolve(device, &g, &m);
    if (rc)
        LEAVE(rc);
    if (!isMigDevice)
        LEAVE(NVML_ERROR_INVALID_ARGUMENT);
    *isMigDevice = m ? 1 : 0;
    LEAVE(NVML_SUCCESS);
}

EXPORT nvmlReturn_t nvmlDeviceGetGpuInstanceId(nvmlDevice_t device, unsigned int *id)
{
    struct gpu *g;
    struct mig *m;
    ENTER();
    nvmlReturn_t rc = resolve(device, &g, &m);
    if (rc)
        LEAVE(rc);
    if (!id)
        LEAVE(NVML_ERROR_INVALID_ARGUMENT);
    if (!m)
        LEAVE(NVML_ERROR_NOT_SUPPORTED);
    *id = m->gi;
    LEAVE(NVML_SUCCESS);
}

EXPORT nvmlReturn_t nvmlDeviceGetComputeInstanceId(nvmlDevice_t device, unsigned int *id)
{
    struct gpu *g;
    struct mig *m;
    ENTER();
    nvmlReturn_t rc = resolve(device, &g, &m);
    if (rc)
        LEAVE(rc);
    if (!id)
        LEAVE(NVML_ERROR_INVALID_ARGUMENT);
    if (!m)
        LEAVE(NVML_ERROR_NOT_SUPPORTED);
    *id = m->ci;
    LEAVE(NVML_SUCCESS);
}

/* ---- NVLink and topology ---- */

/* Links at or past the GPU's nvlink_count answer NOT_SUPPORTED, as on real GPUs
 * with fewer than NVML_NVLINK_MAX_LINKS links (callers loop to the maximum). */
static nvmlReturn_t nvlink_port(nvmlDevice_t device, unsigned int link, struct gpu **g)
{
    nvmlReturn_t rc = resolve_gpu(device, g, NVML_ERROR_NOT_SUPPORTED);
    if (rc)
        return rc;
    if (link >= NVML_NVLINK_MAX_LINKS)
        return NVML_ERROR_INVALID_ARGUMENT;
    if (link >= (unsigned)(*g)->nvlink_count)
        return NVML_ERROR_NOT_SUPPORTED;
    return NVML_SUCCESS;
}

EXPORT nvmlReturn_t nvmlDeviceGetNvLinkState(nvmlDevice_t device, unsigned int link, int *isActive)
{
    struct gpu *g;
    ENTER();
    nvmlReturn_t rc = nvlink_port(device, link, &g);
    if (rc)
        LEAVE(rc);
    if (!isActive)
        LEAVE(NVML_ERROR_INVALID_ARGUMENT);
    *isActive = g->link_peer[link] >= 0 ? 1 : 0;
    LEAVE(NVML_SUCCESS);
}

EXPORT nvmlReturn_t nvmlDeviceGetNvLinkRemotePciInfo_v2(nvmlDevice_t device, unsigned int link, nvmlPciInfo_t *pci)
{
    struct gpu *g;
    ENTER();
    nvmlReturn_t rc = nvlink_port(device, link, &g);
    if (rc)
        LEAVE(rc);
    if (!pci)
        LEAVE(NVML_ERROR_INVALID_ARGUMENT);
    if (g->link_peer[link] < 0)
        LEAVE(NVML_ERROR_NOT_SUPPORTED);
    fill_pci(&g_gpus[g->link_peer[link]], pci);
    LEAVE(NVML_SUCCESS);
}

EXPORT nvmlReturn_t nvmlDeviceGetNvLinkRemotePciInfo(nvmlDevice_t device, unsigned int link, nvmlPciInfo_t *pci)
{
    return nvmlDeviceGetNvLinkRemotePciInfo_v2(device, link, pci);
}

EXPORT nvmlReturn_t nvmlDeviceGetTopologyCommonAncestor(nvmlDevice_t device1, nvmlDevice_t device2,
                                                        unsigned int *pathInfo)
{
    struct gpu *a, *b;
    ENTER();
    nvmlReturn_t rc = resolve_gpu(device1, &a, NVML_ERROR_NOT_SUPPORTED);
    if (rc == NVML_SUCCESS)
        rc = resolve_gpu(device2, &b, NVML_ERROR_NOT_SUPPORTED);
    if (rc)
        LEAVE(rc);
    if (!pathInfo)
        LEAVE(NVML_ERROR_INVALID_ARGUMENT);
    int level = g_topology[a->dev.slot][b->dev.slot];
    if (a == b)
        level = 0;
    else if (level < 0)
        level = (a->numa_node == b->numa_node) ? 40 : 50;
    *pathInfo = (unsigned)level;
    LEAVE(NVML_SUCCESS);
}

/* ---- events ---- */

static struct fake_event_set *as_set(nvmlEventSet_t set)
{
    char *p = (char *)set, *base = (char *)g_sets;
    if (!set || p < base || p >= (char *)(g_sets + MAX_SETS) ||
        (size_t)(p - base) % sizeof(struct fake_event_set) || !set->in_use)
        return NULL;
    return set;
}

EXPORT nvmlReturn_t nvmlEventSetCreate(nvmlEventSet_t *set)
{
    ENTER();
    if (!set)
        LEAVE(NVML_ERROR_INVALID_ARGUMENT);
    for (int i = 0; i < MAX_SETS; i++) {
        if (!g_sets[i].in_use) {
            memset(&g_sets[i], 0, sizeof g_sets[i]);
            g_sets[i].in_use = 1;
            g_sets[i].cursor = g_nevents;
            *set = &g_sets[i];
            LEAVE(NVML_SUCCESS);
        }
    }
    LEAVE(NVML_ERROR_MEMORY);
}

EXPORT nvmlReturn_t nvmlEventSetFree(nvmlEventSet_t set)
{
    ENTER();
    struct fake_event_set *s = as_set(set);
    if (!s)
        LEAVE(NVML_ERROR_INVALID_ARGUMENT);
    s->in_use = 0;
    LEAVE(NVML_SUCCESS);
}

EXPORT nvmlReturn_t nvmlDeviceGetSupportedEventTypes(nvmlDevice_t device, unsigned long long *eventTypes)
{
    struct gpu *g;
    ENTER();
    nvmlReturn_t rc = resolve_gpu(device, &g, NVML_ERROR_NOT_SUPPORTED);
    if (rc)
        LEAVE(rc);
    if (!eventTypes)
        LEAVE(NVML_ERROR_INVALID_ARGUMENT);
    *eventTypes = g->supported_events;
    LEAVE(NVML_SUCCESS);
}

EXPORT nvmlReturn_t nvmlDeviceRegisterEvents(nvmlDevice_t device, unsigned long long eventTypes, nvmlEventSet_t set)
{
    struct gpu *g;
    ENTER();
    nvmlReturn_t rc = resolve_gpu(device, &g, NVML_ERROR_NOT_SUPPORTED);
    if (rc)
        LEAVE(rc);
    struct fake_event_set *s = as_set(set);
    if (!s)
        LEAVE(NVML_ERROR_INVALID_ARGUMENT);
    if (eventTypes & ~g->supported_events)
        LEAVE(NVML_ERROR_NOT_SUPPORTED);
    if (s->nregs == MAX_REGS)
        LEAVE(NVML_ERROR_MEMORY);
    s->regs[s->nregs++] = (struct registration){.gpu = g->dev.slot, .mask = eventTypes, .since = g_nevents};
    LEAVE(NVML_SUCCESS);
}

/* Finds the next event for the set; 1 = event, -1 = fail-wait marker, 0 = none. */
static int next_event(struct fake_event_set *s, struct event *out)
{
    while (s->cursor < g_nevents) {
        size_t seq = s->cursor++;
        const struct event *ev = &g_events[seq];
        if (ev->fail) {
            return -1;
        }
        for (int r = 0; r < s->nregs; r++) {
            const struct registration *reg = &s->regs[r];
            if (reg->gpu == ev->gpu && (reg->mask & ev->type) && seq >= reg->since) {
                *out = *ev;
                return 1;
            }
        }
    }
    return 0;
}

static long long now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

EXPORT nvmlReturn_t nvmlEventSetWait_v2(nvmlEventSet_t set, nvmlEventData_t *data, unsigned int timeoutms)
{
    const long long deadline = now_ms() + timeoutms;
    for (;;) {
        ENTER();
        struct fake_event_set *s = as_set(set);
        if (!s || !data)
            LEAVE(NVML_ERROR_INVALID_ARGUMENT);
        struct event ev;
        int found = next_event(s, &ev);
        if (found < 0)
            LEAVE(NVML_ERROR_UNKNOWN);
        if (found > 0) {
            data->device = &g_gpus[ev.gpu].dev;
            data->eventType = ev.type;
            data->eventData = ev.data;
            data->gpuInstanceId = ev.gi;
            data->computeInstanceId = ev.ci;
            LEAVE(NVML_SUCCESS);
        }
        pthread_mutex_unlock(&g_lock);
        long long left = deadline - now_ms();
        if (left <= 0)
            return NVML_ERROR_TIMEOUT;
        struct timespec nap = {0, (left < 10 ? left : 10) * 1000000L};
        nanosleep(&nap, NULL);
    }
}

EXPORT nvmlReturn_t nvmlEventSetWait(nvmlEventSet_t set, nvmlEventData_t *data, unsigned int timeoutms)
{
    return nvmlEventSetWait_v2(set, data, timeoutms);
}
