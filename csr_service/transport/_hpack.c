/* HPACK header-block decoding (RFC 7541) in C: csr_service.transport._hpack.
 *
 * The same decoder as hpack_decoder.py (its reference, and what runs where this module was not
 * built), with the same checks, errors and results, field for field. Why in C: the native
 * transport decodes every header block a client sends, refused calls' included (the dynamic
 * table must see them all), and under overload refusals are most of what a worker does. In
 * Python a grpc-go request's block costs 2-6 us (a literal per call: grpc-timeout) and the first
 * block on a connection ~70 us (the token, Huffman-coded); here well under a microsecond and a
 * few microseconds. Decoded fields are tuples (name, value) of bytes; an indexed field is the
 * table's own tuple, shared, as in Python.
 *
 * RFC 7541's tables (the static table, the Huffman code) are not copied here: hpack_decoder.py
 * hands its own to setup() once, at import, with the exception class to raise, so both decoders
 * read the same tables (and the static table's fields are the very same tuples).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <stdint.h>

/* ------------------------------------------------------------------ Huffman decoding */
/* A byte-at-a-time table: entry [state][byte] is the next state and the 0-2 symbols the byte
 * completes. States are the code tree's 256 inner nodes (0: the root) and FAIL (EOS decoded,
 * absorbing), so the loop does one lookup per byte and checks for failure at the end. */
#define INNER 256
#define FAIL INNER
#define EOS 256

typedef struct {
    uint16_t next;
    uint8_t count;
    uint8_t symbols[2];
} Step;

static Step huffman[(INNER + 1) * 256];
static uint8_t accepting[INNER + 1]; /* a string may end here: the root, or 1-7 bits of EOS's ones */

/* The decoding table from each symbol's code and length (RFC 7541 Appendix B); -1 if they do
 * not make a complete prefix code of 257 symbols. */
static int
build_huffman(const uint32_t *CODES, const uint8_t *LENGTHS)
{
    int16_t children[INNER][2]; /* >= 0: an inner node; < 0: ~symbol; 0 unset (the root is nobody's child) */
    int nodes = 1;
    memset(children, 0, sizeof children);
    for (int symbol = 0; symbol <= EOS; symbol++) {
        uint32_t code = CODES[symbol];
        int node = 0;
        if (LENGTHS[symbol] < 1 || LENGTHS[symbol] > 30) {
            return -1;
        }
        for (int shift = LENGTHS[symbol] - 1; shift > 0; shift--) {
            int bit = (code >> shift) & 1;
            if (children[node][bit] == 0) {
                if (nodes >= INNER) {
                    return -1;
                }
                children[node][bit] = (int16_t)nodes++;
            }
            node = children[node][bit];
            if (node < 0) {
                return -1; /* a code that extends another: not a prefix code */
            }
        }
        if (children[node][code & 1] != 0) {
            return -1; /* two symbols, one code */
        }
        children[node][code & 1] = (int16_t)~symbol;
    }
    if (nodes != INNER) {
        return -1;
    }
    for (int state = 0; state <= INNER; state++) {
        for (int byte = 0; byte < 256; byte++) {
            Step *step = &huffman[state * 256 + byte];
            int node = state;
            step->count = 0;
            for (int shift = 7; shift >= 0 && node != FAIL; shift--) {
                int child = children[node][(byte >> shift) & 1];
                if (child > 0) {
                    node = child;
                }
                else if (~child == EOS) {
                    node = FAIL;
                }
                else {
                    if (step->count >= 2) {
                        return -1; /* cannot happen: the shortest code is 5 bits */
                    }
                    step->symbols[step->count++] = (uint8_t)~child;
                    node = 0;
                }
            }
            step->next = (uint16_t)node;
        }
    }
    int node = 0;
    accepting[0] = 1;
    for (int i = 0; i < 7; i++) {
        int child = children[node][1];
        if (child <= 0) {
            break;
        }
        node = child;
        accepting[node] = 1;
    }
    return 0;
}

static PyObject *HPACKError = NULL; /* setup(): hpack_decoder.HPACKError */
static int ready = 0;               /* setup() done: the tables are built */

static void
fail(const char *format, ...)
{
    va_list args;
    va_start(args, format);
    PyErr_FormatV(HPACKError, format, args); /* set: nothing decodes before setup() */
    va_end(args);
}

/* A new bytes object; NULL with HPACKError if the string is not a Huffman code's. */
static PyObject *
huffman_decode_raw(const uint8_t *data, Py_ssize_t length)
{
    uint8_t small[1024];
    Py_ssize_t most = length * 8 / 5 + 1;
    uint8_t *out = most <= (Py_ssize_t)sizeof small ? small : PyMem_Malloc((size_t)most);
    if (out == NULL) {
        return PyErr_NoMemory();
    }
    Py_ssize_t n = 0;
    unsigned state = 0;
    for (Py_ssize_t i = 0; i < length; i++) {
        const Step *step = &huffman[state * 256 + data[i]];
        /* Both symbols stored always: count says how many are real (no branch per byte). */
        out[n] = step->symbols[0];
        out[n + 1] = step->symbols[1];
        n += step->count;
        state = step->next;
    }
    PyObject *result = NULL;
    if (!accepting[state]) {
        fail("invalid Huffman string (EOS or bad padding)");
    }
    else {
        result = PyBytes_FromStringAndSize((const char *)out, n);
    }
    if (out != small) {
        PyMem_Free(out);
    }
    return result;
}

/* ------------------------------------------------------------------ the block's primitives */
/* An HPACK integer (RFC 7541 5.1) whose prefix is block[*pos] & mask; -1 with HPACKError. */
static int64_t
read_integer(const uint8_t *block, Py_ssize_t *pos, Py_ssize_t end, unsigned mask)
{
    int64_t value = block[*pos] & mask;
    (*pos)++;
    if (value < (int64_t)mask) {
        return value;
    }
    int shift = 0;
    for (;;) {
        if (*pos >= end) {
            fail("integer runs past the block");
            return -1;
        }
        uint8_t byte = block[(*pos)++];
        value += (int64_t)(byte & 0x7F) << shift;
        if (!(byte & 0x80)) {
            return value;
        }
        shift += 7;
        if (shift > 28) { /* nothing we accept needs more than 2^28 */
            fail("integer too large");
            return -1;
        }
    }
}

/* An HPACK string literal (RFC 7541 5.2) as a new bytes object; NULL with HPACKError. */
static PyObject *
read_string(const uint8_t *block, Py_ssize_t *pos, Py_ssize_t end)
{
    if (*pos >= end) {
        fail("string missing at the end of the block");
        return NULL;
    }
    int huffman_coded = block[*pos] & 0x80;
    int64_t length = read_integer(block, pos, end, 0x7F);
    if (length < 0) {
        return NULL;
    }
    if (length > end - *pos) {
        fail("string runs past the block");
        return NULL;
    }
    const uint8_t *raw = block + *pos;
    *pos += (Py_ssize_t)length;
    if (huffman_coded) {
        return huffman_decode_raw(raw, (Py_ssize_t)length);
    }
    return PyBytes_FromStringAndSize((const char *)raw, (Py_ssize_t)length);
}

/* ------------------------------------------------------------------ the decoder */
typedef struct {
    PyObject *field; /* (name, value), both bytes */
    Py_ssize_t size; /* RFC 7541 4.1: name + value + 32 */
} Entry;

static Entry static_entries[61];

typedef struct {
    PyObject_HEAD
    Py_ssize_t max_table_size;       /* our SETTINGS_HEADER_TABLE_SIZE */
    Py_ssize_t max_header_list_size; /* our SETTINGS_MAX_HEADER_LIST_SIZE */
    Py_ssize_t limit;                /* the table's size now: the client may lower it */
    Py_ssize_t size;                 /* octets the table holds */
    Entry *ring;                     /* capacity entries; an entry is >= 32 octets */
    Py_ssize_t capacity, oldest, count;
} Decoder;

static Entry *
dynamic_entry(Decoder *self, Py_ssize_t position) /* 0: the newest (HPACK index 62) */
{
    return &self->ring[(self->oldest + self->count - 1 - position) % self->capacity];
}

/* The entry at an HPACK index (1-based over both tables); NULL with HPACKError. */
static Entry *
entry_at(Decoder *self, int64_t index)
{
    if (index > 0 && index <= 61) {
        return &static_entries[index - 1];
    }
    if (index <= 0 || index - 62 >= self->count) {
        fail("header index %lld is outside the tables", (long long)index);
        return NULL;
    }
    return dynamic_entry(self, (Py_ssize_t)(index - 62));
}

static void
evict(Decoder *self, Py_ssize_t limit) /* drop the oldest entries until size <= limit */
{
    while (self->size > limit && self->count > 0) {
        Entry *entry = &self->ring[self->oldest];
        self->size -= entry->size;
        Py_CLEAR(entry->field);
        self->oldest = (self->oldest + 1) % self->capacity;
        self->count--;
    }
}

static void
add(Decoder *self, PyObject *field, Py_ssize_t size) /* borrows field */
{
    if (size > self->limit) { /* RFC 7541 4.4: the table is emptied, the field not added */
        evict(self, 0);
        return;
    }
    evict(self, self->limit - size);
    Entry *entry = &self->ring[(self->oldest + self->count) % self->capacity];
    Py_INCREF(field);
    entry->field = field;
    entry->size = size;
    self->count++;
    self->size += size;
}

static int
Decoder_init(Decoder *self, PyObject *args, PyObject *kwargs)
{
    static char *keywords[] = {"max_table_size", "max_header_list_size", NULL};
    Py_ssize_t max_table_size = 4096, max_header_list_size = 65536;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "|$nn", keywords, &max_table_size, &max_header_list_size)) {
        return -1;
    }
    if (!ready) {
        PyErr_SetString(PyExc_RuntimeError, "_hpack.setup() has not been called (hpack_decoder does it)");
        return -1;
    }
    if (max_table_size < 0 || max_header_list_size < 0) {
        PyErr_SetString(PyExc_ValueError, "sizes must not be negative");
        return -1;
    }
    if (self->ring != NULL) {
        evict(self, 0);
        PyMem_Free(self->ring);
    }
    self->capacity = max_table_size / 32 + 1;
    self->ring = PyMem_Calloc((size_t)self->capacity, sizeof(Entry));
    if (self->ring == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    self->max_table_size = max_table_size;
    self->max_header_list_size = max_header_list_size;
    self->limit = max_table_size;
    self->size = self->oldest = self->count = 0;
    return 0;
}

static void
Decoder_dealloc(Decoder *self)
{
    if (self->ring != NULL) {
        evict(self, 0);
        PyMem_Free(self->ring);
    }
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *
Decoder_decode(Decoder *self, PyObject *arg)
{
    if (self->ring == NULL) { /* Decoder.__new__ without __init__ */
        PyErr_SetString(PyExc_RuntimeError, "Decoder not initialised");
        return NULL;
    }
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0) {
        return NULL;
    }
    const uint8_t *block = view.buf;
    Py_ssize_t pos = 0, end = view.len, listed = 0;
    PyObject *fields = PyList_New(0);
    if (fields == NULL) {
        goto error;
    }
    while (pos < end) {
        uint8_t first = block[pos];
        PyObject *field;
        Py_ssize_t size;
        if (first & 0x80) { /* indexed field (6.1) */
            int64_t index = read_integer(block, &pos, end, 0x7F);
            if (index < 0) {
                goto error;
            }
            Entry *entry = entry_at(self, index);
            if (entry == NULL) {
                goto error;
            }
            field = entry->field;
            Py_INCREF(field);
            size = entry->size;
        }
        else if ((first & 0x60) == 0x20) { /* dynamic table size update (6.3): only before the first field */
            if (PyList_GET_SIZE(fields) > 0) {
                fail("dynamic table size update after a header field");
                goto error;
            }
            int64_t limit = read_integer(block, &pos, end, 0x1F);
            if (limit < 0) {
                goto error;
            }
            if (limit > self->max_table_size) {
                fail("dynamic table size %lld above the %zd allowed", (long long)limit, self->max_table_size);
                goto error;
            }
            self->limit = (Py_ssize_t)limit;
            evict(self, self->limit);
            continue;
        }
        else { /* a literal: with incremental indexing (6.2.1), without (6.2.2), never indexed (6.2.3) */
            int indexing = first & 0x40;
            int64_t index = read_integer(block, &pos, end, indexing ? 0x3F : 0x0F);
            if (index < 0) {
                goto error;
            }
            PyObject *name;
            if (index) {
                Entry *entry = entry_at(self, index);
                if (entry == NULL) {
                    goto error;
                }
                name = PyTuple_GET_ITEM(entry->field, 0);
                Py_INCREF(name);
            }
            else {
                name = read_string(block, &pos, end);
                if (name == NULL) {
                    goto error;
                }
            }
            PyObject *value = read_string(block, &pos, end);
            if (value == NULL) {
                Py_DECREF(name);
                goto error;
            }
            size = PyBytes_GET_SIZE(name) + PyBytes_GET_SIZE(value) + 32;
            field = PyTuple_New(2);
            if (field == NULL) {
                Py_DECREF(name);
                Py_DECREF(value);
                goto error;
            }
            PyTuple_SET_ITEM(field, 0, name);
            PyTuple_SET_ITEM(field, 1, value);
            if (indexing) {
                add(self, field, size);
            }
        }
        listed += size;
        if (listed > self->max_header_list_size) {
            Py_DECREF(field);
            fail("header list larger than %zd bytes", self->max_header_list_size);
            goto error;
        }
        if (PyList_Append(fields, field) < 0) {
            Py_DECREF(field);
            goto error;
        }
        Py_DECREF(field);
    }
    PyBuffer_Release(&view);
    return fields;
error:
    Py_XDECREF(fields);
    PyBuffer_Release(&view);
    return NULL;
}

static PyObject *
Decoder_table_size(Decoder *self, void *closure)
{
    (void)closure;
    return PyLong_FromSsize_t(self->size);
}

static PyMethodDef Decoder_methods[] = {
    {"decode", (PyCFunction)Decoder_decode, METH_O,
     "The header list a complete header block carries (names and values as octets)."},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef Decoder_members[] = {
    {"max_table_size", T_PYSSIZET, offsetof(Decoder, max_table_size), READONLY,
     "Our SETTINGS_HEADER_TABLE_SIZE: the most of the dynamic table the client may use."},
    {"max_header_list_size", T_PYSSIZET, offsetof(Decoder, max_header_list_size), READONLY,
     "Our SETTINGS_MAX_HEADER_LIST_SIZE, enforced on what a block decodes to."},
    {NULL, 0, 0, 0, NULL},
};

static PyGetSetDef Decoder_getset[] = {
    {"table_size", (getter)Decoder_table_size, NULL, "Octets the dynamic table holds, as RFC 7541 4.1 counts them.",
     NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject DecoderType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "csr_service.transport._hpack.Decoder",
    .tp_doc = "One connection's HPACK decoding state: its dynamic table, and the limits we advertised.",
    .tp_basicsize = sizeof(Decoder),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Decoder_init,
    .tp_dealloc = (destructor)Decoder_dealloc,
    .tp_methods = Decoder_methods,
    .tp_members = Decoder_members,
    .tp_getset = Decoder_getset,
};

/* ------------------------------------------------------------------ the module */
static PyObject *
huffman_decode(PyObject *module, PyObject *arg)
{
    (void)module;
    if (!ready) {
        PyErr_SetString(PyExc_RuntimeError, "_hpack.setup() has not been called (hpack_decoder does it)");
        return NULL;
    }
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0) {
        return NULL;
    }
    PyObject *result = huffman_decode_raw(view.buf, view.len);
    PyBuffer_Release(&view);
    return result;
}

/* setup(error, static_entries, codes, lengths): hpack_decoder.py's HPACKError, _STATIC_ENTRIES
 * (61 of ((name, value), size)), _CODES and _LENGTHS (257 each). The first call that succeeds
 * counts; later calls change nothing. */
static PyObject *
setup(PyObject *module, PyObject *args)
{
    (void)module;
    PyObject *cls, *entries, *codes, *lengths;
    if (!PyArg_ParseTuple(args, "OO!O!O!", &cls, &PyTuple_Type, &entries, &PyTuple_Type, &codes, &PyTuple_Type,
                          &lengths)) {
        return NULL;
    }
    if (ready) {
        Py_RETURN_NONE;
    }
    if (!PyExceptionClass_Check(cls)) {
        PyErr_SetString(PyExc_TypeError, "an exception class is needed");
        return NULL;
    }
    if (PyTuple_GET_SIZE(entries) != 61 || PyTuple_GET_SIZE(codes) != EOS + 1 || PyTuple_GET_SIZE(lengths) != EOS + 1) {
        PyErr_SetString(PyExc_ValueError, "RFC 7541's tables: 61 static entries, 257 codes and lengths");
        return NULL;
    }
    uint32_t code_values[EOS + 1];
    uint8_t length_values[EOS + 1];
    for (int i = 0; i <= EOS; i++) {
        unsigned long code = PyLong_AsUnsignedLong(PyTuple_GET_ITEM(codes, i));
        long length = PyLong_AsLong(PyTuple_GET_ITEM(lengths, i));
        if (PyErr_Occurred()) {
            return NULL;
        }
        if (code > UINT32_MAX || length < 0 || length > UINT8_MAX) {
            PyErr_SetString(PyExc_ValueError, "a Huffman code or length out of range");
            return NULL;
        }
        code_values[i] = (uint32_t)code;
        length_values[i] = (uint8_t)length;
    }
    Entry built[61];
    for (int i = 0; i < 61; i++) {
        PyObject *entry = PyTuple_GET_ITEM(entries, i), *field;
        Py_ssize_t size;
        if (!PyArg_ParseTuple(entry, "O!n", &PyTuple_Type, &field, &size) || PyTuple_GET_SIZE(field) != 2 ||
            !PyBytes_Check(PyTuple_GET_ITEM(field, 0)) || !PyBytes_Check(PyTuple_GET_ITEM(field, 1))) {
            PyErr_Clear();
            PyErr_SetString(PyExc_ValueError, "a static entry is not ((name, value), size) of bytes");
            return NULL;
        }
        built[i].field = field;
        built[i].size = size;
    }
    if (build_huffman(code_values, length_values) < 0) {
        PyErr_SetString(PyExc_ValueError, "the Huffman code table is not a complete code");
        return NULL;
    }
    for (int i = 0; i < 61; i++) {
        Py_INCREF(built[i].field); /* kept for the module's life */
        static_entries[i] = built[i];
    }
    Py_INCREF(cls);
    HPACKError = cls;
    ready = 1;
    Py_RETURN_NONE;
}

static PyMethodDef module_methods[] = {
    {"huffman_decode", huffman_decode, METH_O,
     "Decode an HPACK Huffman string (RFC 7541 5.2); the error class if it is not one."},
    {"setup", setup, METH_VARARGS,
     "setup(error, static_entries, codes, lengths): the error class and RFC 7541's tables (hpack_decoder.py's)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, .m_name = "csr_service.transport._hpack",
    .m_doc = "HPACK header-block decoding (RFC 7541) in C; see hpack_decoder.py.", .m_size = -1,
    .m_methods = module_methods,
};

PyMODINIT_FUNC
PyInit__hpack(void)
{
    if (PyType_Ready(&DecoderType) < 0) {
        return NULL;
    }
    PyObject *module = PyModule_Create(&module_def);
    if (module == NULL) {
        return NULL;
    }
    Py_INCREF(&DecoderType);
    if (PyModule_AddObject(module, "Decoder", (PyObject *)&DecoderType) < 0) {
        Py_DECREF(&DecoderType);
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
