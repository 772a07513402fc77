/* metabridge's Envoy network dynamic module: runs the bridge's Python core inside Envoy.
 *
 * Envoy (1.40, ABI v0.2.0) calls the hooks below on its worker threads; each one takes the
 * worker's own Python thread state, calls metabridge.transport.inprocess and gives the GIL back.
 * Python reaches Envoy through the small `_metabridge_native` module defined here (inject bytes,
 * close, schedule an event onto the connection's worker). All protocol work is in Python; this
 * file only moves bytes and contains Python failures (a Python exception never unwinds into
 * Envoy: it is printed and the connection is closed).
 *
 * Only the hooks and callbacks used here are declared: the types are Envoy's, by value.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <dlfcn.h>
#include <pthread.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* ---- Envoy's ABI (the subset used) ------------------------------------------------------ */

typedef const void *envoy_ptr;          /* the *_envoy_ptr types: Envoy's objects */
typedef const void *module_ptr;         /* the *_module_ptr types: ours */
typedef struct { const char *ptr; size_t length; } envoy_buffer; /* envoy_buffer / module_buffer */

enum { STATUS_CONTINUE = 0, STATUS_STOP_ITERATION = 1 };
enum { CLOSE_FLUSH_WRITE = 0, CLOSE_NO_FLUSH = 1 };

extern size_t envoy_dynamic_module_callback_network_filter_get_read_buffer_chunks_size(envoy_ptr);
extern bool envoy_dynamic_module_callback_network_filter_get_read_buffer_chunks(envoy_ptr, envoy_buffer *);
extern size_t envoy_dynamic_module_callback_network_filter_get_read_buffer_size(envoy_ptr);
extern bool envoy_dynamic_module_callback_network_filter_drain_read_buffer(envoy_ptr, size_t);
extern bool envoy_dynamic_module_callback_network_filter_append_read_buffer(envoy_ptr, envoy_buffer);
extern size_t envoy_dynamic_module_callback_network_filter_get_write_buffer_chunks_size(envoy_ptr);
extern bool envoy_dynamic_module_callback_network_filter_get_write_buffer_chunks(envoy_ptr, envoy_buffer *);
extern size_t envoy_dynamic_module_callback_network_filter_get_write_buffer_size(envoy_ptr);
extern bool envoy_dynamic_module_callback_network_filter_drain_write_buffer(envoy_ptr, size_t);
extern bool envoy_dynamic_module_callback_network_filter_append_write_buffer(envoy_ptr, envoy_buffer);
extern void envoy_dynamic_module_callback_network_filter_inject_read_data(envoy_ptr, envoy_buffer, bool);
extern void envoy_dynamic_module_callback_network_filter_inject_write_data(envoy_ptr, envoy_buffer, bool);
extern void envoy_dynamic_module_callback_network_filter_close(envoy_ptr, int);
extern void *envoy_dynamic_module_callback_network_filter_scheduler_new(envoy_ptr);
extern void envoy_dynamic_module_callback_network_filter_scheduler_commit(void *, uint64_t);
extern void envoy_dynamic_module_callback_network_filter_scheduler_delete(void *);
extern int envoy_dynamic_module_callback_network_filter_config_define_counter(envoy_ptr, envoy_buffer, size_t *);
extern int envoy_dynamic_module_callback_network_filter_increment_counter(envoy_ptr, size_t, uint64_t);

/* Envoy's counter of Python failures the transport contained (each closed its connection). */
static const char ERRORS_COUNTER[] = "metabridge_inprocess_errors";

/* ---- state ------------------------------------------------------------------------------- */

typedef struct {
  PyObject *factory; /* inprocess.FilterFactory */
  size_t errors;     /* ERRORS_COUNTER's id */
  bool has_errors;
} filter_config;

typedef struct {
  envoy_ptr envoy;    /* Envoy's filter: valid until the destroy hook */
  void *scheduler;    /* events onto this connection's worker */
  PyObject *session;  /* inprocess.Session, or NULL */
  PyObject *factory;
  filter_config *config;
} filter;

static void count_error(filter *f) {
  if (f->envoy != NULL && f->config != NULL && f->config->has_errors)
    envoy_dynamic_module_callback_network_filter_increment_counter(f->envoy, f->config->errors, 1);
}

static PyObject *g_module; /* metabridge.transport.inprocess */
static bool g_ready;
/* One thread state per Envoy thread: creating one per call costs several microseconds. */
static __thread PyThreadState *t_state;
static PyInterpreterState *g_interp;

/* Held by a thread while it is in a hook (the outermost; Envoy may call one hook from inside
 * another on the same thread), and by a config reload while it applies (hold_hooks), so that a
 * connection sees the core's runtimes from one config, never halfway. Always taken before the
 * GIL, never while holding it, so the two cannot deadlock; it costs no parallelism, as the GIL
 * serializes the hooks anyway. */
static pthread_mutex_t g_hooks = PTHREAD_MUTEX_INITIALIZER;
static __thread int t_depth; /* hooks this thread is in */

static void enter(void) {
  if (t_state == NULL) t_state = PyThreadState_New(g_interp);
  if (t_depth++ == 0) pthread_mutex_lock(&g_hooks);
  PyEval_RestoreThread(t_state);
}

static void leave(void) {
  PyEval_SaveThread();
  if (--t_depth == 0) pthread_mutex_unlock(&g_hooks);
}

/* A Python failure the module cannot hand to Python's own handling: print it (once per call). */
static void report(const char *where) {
  fprintf(stderr, "metabridge native module: Python raised in %s:\n", where);
  PyErr_Print();
}

/* ---- _metabridge_native: what Python may ask of Envoy ------------------------------------- */

static filter *handle_of(PyObject *arg) {
  void *p = PyLong_AsVoidPtr(arg);
  return (filter *)p;
}

static PyObject *py_inject(PyObject *args, bool read) {
  PyObject *h;
  Py_buffer data;
  int end = 0;
  if (!PyArg_ParseTuple(args, "Oy*|p", &h, &data, &end)) return NULL;
  filter *f = handle_of(h);
  if (f == NULL || f->envoy == NULL) {
    PyBuffer_Release(&data);
    PyErr_SetString(PyExc_RuntimeError, "connection already destroyed");
    return NULL;
  }
  envoy_buffer b = {(const char *)data.buf, (size_t)data.len};
  /* Envoy may call back into this module (the write hook) while injecting: that hook takes
   * the GIL itself, so release it here. */
  PyThreadState *ts = PyEval_SaveThread();
  if (read)
    envoy_dynamic_module_callback_network_filter_inject_read_data(f->envoy, b, end != 0);
  else
    envoy_dynamic_module_callback_network_filter_inject_write_data(f->envoy, b, end != 0);
  PyEval_RestoreThread(ts);
  PyBuffer_Release(&data);
  Py_RETURN_NONE;
}

static PyObject *py_inject_read(PyObject *self, PyObject *args) { return py_inject(args, true); }
static PyObject *py_inject_write(PyObject *self, PyObject *args) { return py_inject(args, false); }

static PyObject *py_close(PyObject *self, PyObject *args) {
  PyObject *h;
  int flush = 1;
  if (!PyArg_ParseTuple(args, "O|p", &h, &flush)) return NULL;
  filter *f = handle_of(h);
  if (f == NULL || f->envoy == NULL) Py_RETURN_NONE;
  PyThreadState *ts = PyEval_SaveThread(); /* closing runs the event hook */
  envoy_dynamic_module_callback_network_filter_close(f->envoy, flush ? CLOSE_FLUSH_WRITE : CLOSE_NO_FLUSH);
  PyEval_RestoreThread(ts);
  Py_RETURN_NONE;
}

/* Thread-safe: Envoy posts the event to the connection's worker. The caller holds the GIL, and
 * the destroy hook deletes the scheduler only while holding it, so the two never race. */
static PyObject *py_schedule(PyObject *self, PyObject *args) {
  PyObject *h;
  if (!PyArg_ParseTuple(args, "O", &h)) return NULL;
  filter *f = handle_of(h);
  if (f == NULL || f->scheduler == NULL) Py_RETURN_FALSE;
  envoy_dynamic_module_callback_network_filter_scheduler_commit(f->scheduler, 0);
  Py_RETURN_TRUE;
}

static PyObject *py_count_error(PyObject *self, PyObject *args) {
  PyObject *h;
  if (!PyArg_ParseTuple(args, "O", &h)) return NULL;
  filter *f = handle_of(h);
  if (f != NULL) count_error(f);
  Py_RETURN_NONE;
}

/* A reload (a Python thread of its own, with the GIL): wait until no hook runs, then keep them
 * out until release_hooks. The GIL is released while waiting, so the hook in progress can end. */
static PyObject *py_hold_hooks(PyObject *self, PyObject *unused) {
  if (t_depth > 0) {
    PyErr_SetString(PyExc_RuntimeError, "hold_hooks() called from inside a hook: it would wait for itself");
    return NULL;
  }
  Py_BEGIN_ALLOW_THREADS
  pthread_mutex_lock(&g_hooks);
  Py_END_ALLOW_THREADS
  Py_RETURN_NONE;
}

static PyObject *py_release_hooks(PyObject *self, PyObject *unused) {
  pthread_mutex_unlock(&g_hooks);
  Py_RETURN_NONE;
}

static PyMethodDef native_methods[] = {
    {"hold_hooks", py_hold_hooks, METH_NOARGS, "hold_hooks(): wait until no hook runs on any Envoy thread, and keep them out until release_hooks()"},
    {"release_hooks", py_release_hooks, METH_NOARGS, "release_hooks(): let the hooks run again"},
    {"count_error", py_count_error, METH_VARARGS, "count_error(handle): add one to Envoy's metabridge_inprocess_errors counter"},
    {"inject_read", py_inject_read, METH_VARARGS, "inject_read(handle, data, end=False): bytes to the filters after this one (HCM)"},
    {"inject_write", py_inject_write, METH_VARARGS, "inject_write(handle, data, end=False): bytes to the client"},
    {"close", py_close, METH_VARARGS, "close(handle, flush=True): close the client connection"},
    {"schedule", py_schedule, METH_VARARGS, "schedule(handle): run the session's on_scheduled on its worker"},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef native_def = {PyModuleDef_HEAD_INIT, "_metabridge_native", "Envoy's side of the in-process transport.", -1, native_methods};

static PyObject *init_native(void) { return PyModule_Create(&native_def); }

/* ---- program init --------------------------------------------------------------------------- */

const char *envoy_dynamic_module_on_program_init(void) {
  /* Envoy opens modules RTLD_LOCAL: C extensions loaded by Python need libpython's symbols
   * global, or they fail with undefined symbols. */
  if (dlopen(METABRIDGE_LIBPYTHON, RTLD_NOW | RTLD_GLOBAL) == NULL)
    fprintf(stderr, "metabridge native module: cannot re-open %s globally: %s\n", METABRIDGE_LIBPYTHON, dlerror());
  PyImport_AppendInittab("_metabridge_native", init_native);
  PyConfig config;
  PyConfig_InitPythonConfig(&config);
  config.install_signal_handlers = 0; /* Envoy's signals stay Envoy's */
  config.parse_argv = 0;
  /* The interpreter of the environment metabridge is installed in (a venv's python finds its
   * site-packages from pyvenv.cfg): an embedded interpreter would otherwise use the base one. */
  const char *python = getenv("METABRIDGE_PYTHON");
  if (python && *python) {
    PyStatus s = PyConfig_SetBytesString(&config, &config.program_name, python);
    if (PyStatus_Exception(s)) fprintf(stderr, "metabridge native module: bad METABRIDGE_PYTHON\n");
  }
  PyStatus status = Py_InitializeFromConfig(&config);
  PyConfig_Clear(&config);
  if (PyStatus_Exception(status)) {
    fprintf(stderr, "metabridge native module: Python did not start: %s\n", status.err_msg ? status.err_msg : "?");
    return NULL; /* Envoy refuses the module */
  }
  g_interp = PyThreadState_Get()->interp;
  t_state = PyThreadState_Get();
  g_module = PyImport_ImportModule("metabridge.transport.inprocess");
  if (g_module == NULL) {
    report("import metabridge.transport.inprocess");
    PyEval_SaveThread();
    return NULL;
  }
  g_ready = true;
  PyEval_SaveThread();
  return "v0.2.0";
}

/* ---- filter config -------------------------------------------------------------------------- */

module_ptr envoy_dynamic_module_on_network_filter_config_new(envoy_ptr config_envoy, envoy_buffer name, envoy_buffer config) {
  if (!g_ready) return NULL;
  enter();
  filter_config *fc = NULL;
  PyObject *factory = PyObject_CallMethod(g_module, "new_filter_config", "y#y#", name.ptr, (Py_ssize_t)name.length, config.ptr, (Py_ssize_t)config.length);
  if (factory == NULL) {
    report("new_filter_config"); /* Envoy then rejects the listener's configuration */
  } else {
    fc = calloc(1, sizeof *fc);
    fc->factory = factory;
    envoy_buffer name = {ERRORS_COUNTER, sizeof ERRORS_COUNTER - 1};
    fc->has_errors = envoy_dynamic_module_callback_network_filter_config_define_counter(config_envoy, name, &fc->errors) == 0;
  }
  leave();
  return fc;
}

void envoy_dynamic_module_on_network_filter_config_destroy(module_ptr p) {
  filter_config *fc = (filter_config *)p;
  if (fc == NULL) return;
  enter();
  Py_XDECREF(fc->factory);
  leave();
  free(fc);
}

module_ptr envoy_dynamic_module_on_network_filter_new(module_ptr config_ptr, envoy_ptr envoy) {
  filter_config *fc = (filter_config *)config_ptr;
  filter *f = calloc(1, sizeof *f);
  f->envoy = envoy;
  f->config = fc;
  enter();
  Py_INCREF(fc->factory);
  f->factory = fc->factory;
  leave();
  return f;
}

/* ---- per connection ------------------------------------------------------------------------- */

static void close_on_failure(filter *f, const char *where) {
  report(where);
  count_error(f);
  envoy_ptr envoy = f->envoy;
  leave();
  envoy_dynamic_module_callback_network_filter_close(envoy, CLOSE_NO_FLUSH);
  enter();
}

int envoy_dynamic_module_on_network_filter_new_connection(envoy_ptr envoy, module_ptr p) {
  filter *f = (filter *)p;
  f->scheduler = envoy_dynamic_module_callback_network_filter_scheduler_new(envoy);
  enter();
  PyObject *session = PyObject_CallMethod(f->factory, "new_connection", "N", PyLong_FromVoidPtr(f));
  if (session == NULL) {
    close_on_failure(f, "new_connection");
    leave();
    return STATUS_STOP_ITERATION;
  }
  f->session = session;
  leave();
  return STATUS_CONTINUE;
}

/* The buffer's bytes as one Python bytes object; the buffer is then drained. */
static PyObject *take_buffer(envoy_ptr envoy, bool read) {
  size_t total = read ? envoy_dynamic_module_callback_network_filter_get_read_buffer_size(envoy)
                      : envoy_dynamic_module_callback_network_filter_get_write_buffer_size(envoy);
  if (total == 0) return PyBytes_FromStringAndSize(NULL, 0);
  size_t n = read ? envoy_dynamic_module_callback_network_filter_get_read_buffer_chunks_size(envoy)
                  : envoy_dynamic_module_callback_network_filter_get_write_buffer_chunks_size(envoy);
  envoy_buffer stack[16];
  envoy_buffer *chunks = n <= 16 ? stack : malloc(n * sizeof *chunks);
  bool ok = read ? envoy_dynamic_module_callback_network_filter_get_read_buffer_chunks(envoy, chunks)
                 : envoy_dynamic_module_callback_network_filter_get_write_buffer_chunks(envoy, chunks);
  PyObject *bytes = NULL;
  if (ok) {
    bytes = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)total);
    if (bytes != NULL) {
      char *out = PyBytes_AS_STRING(bytes);
      size_t at = 0;
      for (size_t i = 0; i < n && at < total; i++) {
        size_t len = chunks[i].length < total - at ? chunks[i].length : total - at;
        memcpy(out + at, chunks[i].ptr, len);
        at += len;
      }
    }
  } else {
    bytes = PyBytes_FromStringAndSize(NULL, 0);
  }
  if (chunks != stack) free(chunks);
  if (read)
    envoy_dynamic_module_callback_network_filter_drain_read_buffer(envoy, total);
  else
    envoy_dynamic_module_callback_network_filter_drain_write_buffer(envoy, total);
  return bytes;
}

/* Client bytes: the session returns the bytes for HCM, which replace the read buffer. */
static int on_data(envoy_ptr envoy, filter *f, bool end_stream, bool read) {
  if (f->session == NULL) return STATUS_STOP_ITERATION;
  enter();
  int status = STATUS_STOP_ITERATION;
  PyObject *data = take_buffer(envoy, read);
  PyObject *out = data ? PyObject_CallMethod(f->session, read ? "on_read" : "on_write", "NO", data, end_stream ? Py_True : Py_False) : NULL;
  if (out == NULL) {
    close_on_failure(f, read ? "on_read" : "on_write");
  } else {
    if (PyBytes_Check(out) && PyBytes_GET_SIZE(out) > 0) {
      envoy_buffer b = {PyBytes_AS_STRING(out), (size_t)PyBytes_GET_SIZE(out)};
      if (read)
        envoy_dynamic_module_callback_network_filter_append_read_buffer(envoy, b);
      else
        envoy_dynamic_module_callback_network_filter_append_write_buffer(envoy, b);
      status = STATUS_CONTINUE;
    }
    Py_DECREF(out);
  }
  leave();
  return status;
}

int envoy_dynamic_module_on_network_filter_read(envoy_ptr envoy, module_ptr p, size_t length, bool end_stream) {
  return on_data(envoy, (filter *)p, end_stream, true);
}

int envoy_dynamic_module_on_network_filter_write(envoy_ptr envoy, module_ptr p, size_t length, bool end_stream) {
  return on_data(envoy, (filter *)p, end_stream, false);
}

void envoy_dynamic_module_on_network_filter_event(envoy_ptr envoy, module_ptr p, int event) {
  filter *f = (filter *)p;
  if (f->session == NULL) return;
  enter();
  PyObject *out = PyObject_CallMethod(f->session, "on_event", "i", event);
  if (out == NULL) report("on_event");
  Py_XDECREF(out);
  leave();
}

void envoy_dynamic_module_on_network_filter_scheduled(envoy_ptr envoy, module_ptr p, uint64_t event_id) {
  filter *f = (filter *)p;
  if (f->session == NULL) return;
  enter();
  PyObject *out = PyObject_CallMethod(f->session, "on_scheduled", NULL);
  if (out == NULL) close_on_failure(f, "on_scheduled");
  Py_XDECREF(out);
  leave();
}

void envoy_dynamic_module_on_network_filter_destroy(module_ptr p) {
  filter *f = (filter *)p;
  enter();
  if (f->session != NULL) {
    PyObject *out = PyObject_CallMethod(f->session, "on_destroy", NULL);
    if (out == NULL) report("on_destroy");
    Py_XDECREF(out);
    Py_CLEAR(f->session);
  }
  /* Under the GIL: a timer thread's schedule() sees either the scheduler or NULL. */
  if (f->scheduler != NULL) {
    envoy_dynamic_module_callback_network_filter_scheduler_delete(f->scheduler);
    f->scheduler = NULL;
  }
  f->envoy = NULL;
  Py_CLEAR(f->factory);
  leave();
  free(f);
}

/* Hooks Envoy may look up; this module uses none of them. */
void envoy_dynamic_module_on_network_filter_http_callout_done(envoy_ptr e, module_ptr p, uint64_t id, int result, void *h, size_t hs, void *b, size_t bs) {}
void envoy_dynamic_module_on_network_filter_above_write_buffer_high_watermark(envoy_ptr e, module_ptr p) {}
void envoy_dynamic_module_on_network_filter_below_write_buffer_low_watermark(envoy_ptr e, module_ptr p) {}
void envoy_dynamic_module_on_network_filter_config_scheduled(module_ptr p, uint64_t id) {}
