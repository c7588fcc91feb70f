#include "tandem/models/weights.h"

#include <caffe2/serialize/inline_container.h>
#include <torch/serialize.h>
#include <torch/torch.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <sstream>
#include <unordered_map>

#include "tandem/util/check.h"

namespace tandem::models {
namespace {

// ---------------------------------------------------------------------------
// A small unpickler for the subset of pickle that torch.save / pickle_save
// write for dicts of tensors. LibTorch's own turns collections.OrderedDict into
// None (so state_dict() files fail with "Expected GenericDict but got None").
// Unknown globals become opaque objects, so checkpoints holding other Python
// objects still parse as long as the tensors we need are plain.

struct PyVal;
using Val = std::shared_ptr<PyVal>;

enum class Kind { None, Bool, Int, Float, Str, Bytes, Tuple, List, Dict, Tensor, Global, Storage, Object };

struct PyVal {
  Kind kind = Kind::None;
  int64_t i = 0;
  double f = 0;
  std::string s, name;  // Str/Bytes: s. Global: s = module, name. Storage: s = key.
  std::vector<Val> items;  // Tuple / List; Object: {callable, args}
  std::vector<std::pair<Val, Val>> dict;
  at::Tensor tensor;  // Tensor; Storage: the flat storage
};

using StorageLoader = std::function<at::Tensor(const std::string& key, at::ScalarType dtype)>;

class Unpickler {
 public:
  Unpickler(const uint8_t* data, size_t size, std::string file, StorageLoader loader)
      : p_(data), end_(data + size), file_(std::move(file)), loader_(std::move(loader)) {}
  // Note [Unpickled values are freed flat]: a file can nest values as deep as
  // it is long (']' then one TUPLE1 per byte) and make cycles (a list that
  // APPENDs itself through the memo). Each value is also held in all_, and
  // here every value drops its children before any value is freed, so no
  // destructor recurses and no cycle outlives the Unpickler. Values returned
  // by run() are valid while the Unpickler lives.
  ~Unpickler() {
    for (auto& v : all_) {
      v->items.clear();
      v->dict.clear();
    }
  }
  Unpickler(const Unpickler&) = delete;
  Unpickler& operator=(const Unpickler&) = delete;

  Val run() {
    while (true) {
      const uint8_t op = u8();
      switch (op) {
        case 0x80: u8(); break;                      // PROTO
        case 0x95: take(8); break;                   // FRAME
        case '.': return pop();                      // STOP
        case '(': marks_.push_back(stack_.size()); break;  // MARK
        case '}': push(make(Kind::Dict)); break;     // EMPTY_DICT
        case ']': push(make(Kind::List)); break;     // EMPTY_LIST
        case ')': push(make(Kind::Tuple)); break;    // EMPTY_TUPLE
        case 't': push(seq(Kind::Tuple, pop_mark())); break;  // TUPLE
        case 'l': push(seq(Kind::List, pop_mark())); break;   // LIST
        case 0x85: case 0x86: case 0x87: {           // TUPLE1..3
          const size_t n = op - 0x84;
          need(n);
          std::vector<Val> items(stack_.end() - static_cast<std::ptrdiff_t>(n), stack_.end());
          stack_.resize(stack_.size() - n);
          push(seq(Kind::Tuple, std::move(items)));
          break;
        }
        case 'd': {                                  // DICT
          auto items = pop_mark();
          auto d = make(Kind::Dict);
          add_pairs(*d, items);
          push(d);
          break;
        }
        case 'a': {                                  // APPEND
          auto v = pop();
          expect(top(), Kind::List, "APPEND")->items.push_back(v);
          break;
        }
        case 'e': {                                  // APPENDS
          auto items = pop_mark();
          auto& l = expect(top(), Kind::List, "APPENDS")->items;
          l.insert(l.end(), items.begin(), items.end());
          break;
        }
        case 's': {                                  // SETITEM
          auto v = pop();
          auto k = pop();
          add_pairs(*expect(top(), Kind::Dict, "SETITEM"), {k, v});
          break;
        }
        case 'u': {                                  // SETITEMS
          auto items = pop_mark();
          add_pairs(*expect(top(), Kind::Dict, "SETITEMS"), items);
          break;
        }
        case 'q': memo_[u8()] = top(); break;        // BINPUT
        case 'r': memo_[u32()] = top(); break;       // LONG_BINPUT
        case 0x94: memo_[memo_.size()] = top(); break;  // MEMOIZE
        case 'h': push(memo(u8())); break;           // BINGET
        case 'j': push(memo(u32())); break;          // LONG_BINGET
        case 'J': push(make_int(static_cast<int32_t>(u32()))); break;  // BININT
        case 'K': push(make_int(u8())); break;       // BININT1
        case 'M': {                                  // BININT2
          const uint8_t* b = take(2);  // one read: u8() | u8() << 8 leaves the order unspecified
          push(make_int(b[0] | b[1] << 8));
          break;
        }
        case 0x8a: push(make_int(long_le(u8()))); break;  // LONG1
        case 0x8b: push(make_int(long_le(u32()))); break;  // LONG4
        case 'I': case 'L': {                        // INT / LONG (text)
          std::string line = read_line();
          if (!line.empty() && line.back() == 'L') line.pop_back();
          if (op == 'I' && (line == "00" || line == "01")) {
            auto b = make(Kind::Bool);
            b->i = line == "01";
            push(b);
          } else {
            try {
              push(make_int(std::stoll(line)));
            } catch (const std::exception&) {
              bad("integer '" + line + "'");
            }
          }
          break;
        }
        case 'G': {                                  // BINFLOAT (big-endian)
          const uint8_t* b = take(8);
          uint64_t bits = 0;
          for (int k = 0; k < 8; ++k) bits = (bits << 8) | b[k];
          auto v = make(Kind::Float);
          std::memcpy(&v->f, &bits, 8);
          push(v);
          break;
        }
        case 'X': push(str(u32())); break;           // BINUNICODE
        case 0x8c: push(str(u8())); break;           // SHORT_BINUNICODE
        case 0x8d: push(str(u64())); break;          // BINUNICODE8
        case 'U': push(str(u8())); break;            // SHORT_BINSTRING
        case 'T': push(str(u32())); break;           // BINSTRING
        case 'C': push(str(u8(), Kind::Bytes)); break;   // SHORT_BINBYTES
        case 'B': push(str(u32(), Kind::Bytes)); break;  // BINBYTES
        case 0x8e: push(str(u64(), Kind::Bytes)); break; // BINBYTES8
        case 'N': push(make(Kind::None)); break;     // NONE
        case 0x88: case 0x89: {                      // NEWTRUE / NEWFALSE
          auto b = make(Kind::Bool);
          b->i = op == 0x88;
          push(b);
          break;
        }
        case 'c': {                                  // GLOBAL
          auto g = make(Kind::Global);
          g->s = read_line();
          g->name = read_line();
          push(g);
          break;
        }
        case 0x93: {                                 // STACK_GLOBAL
          auto name = pop();
          auto module = pop();
          auto g = make(Kind::Global);
          g->s = module->s;
          g->name = name->s;
          push(g);
          break;
        }
        case 'R': {                                  // REDUCE
          auto args = pop();
          auto fn = pop();
          push(call(fn, args));
          break;
        }
        case 0x81: {                                 // NEWOBJ
          auto args = pop();
          auto cls = pop();
          push(object(cls, args));
          break;
        }
        case 0x92: {                                 // NEWOBJ_EX
          pop();
          auto args = pop();
          auto cls = pop();
          push(object(cls, args));
          break;
        }
        case 'b': pop(); need(1); break;             // BUILD: state ignored (e.g. OrderedDict _metadata)
        case 'Q': push(persistent_load(pop())); break;  // BINPERSID
        case '0': pop(); break;                      // POP
        case '1': pop_mark(); break;                 // POP_MARK
        case '2': push(top()); break;                // DUP
        default: {
          std::ostringstream os;
          os << "unsupported pickle opcode 0x" << std::hex << int(op);
          bad(os.str());
        }
      }
    }
  }

 private:
  Val make(Kind k) {
    auto v = std::make_shared<PyVal>();
    v->kind = k;
    all_.push_back(v);
    return v;
  }
  Val make_int(int64_t i) {
    auto v = make(Kind::Int);
    v->i = i;
    return v;
  }
  Val make_str(std::string s, Kind k = Kind::Str) {
    auto v = make(k);
    v->s = std::move(s);
    return v;
  }

  [[noreturn]] void bad(const std::string& what) const {
    TANDEM_FAIL("cannot read weights file '", file_, "': malformed or unsupported pickle data (", what, ")");
  }
  void need(size_t n) const {
    if (stack_.size() < n) bad("stack underflow");
  }
  const uint8_t* take(size_t n) {
    if (static_cast<size_t>(end_ - p_) < n) bad("unexpected end of data");
    const uint8_t* r = p_;
    p_ += n;
    return r;
  }
  uint8_t u8() { return *take(1); }
  uint32_t u32() {
    const uint8_t* b = take(4);
    return uint32_t(b[0]) | uint32_t(b[1]) << 8 | uint32_t(b[2]) << 16 | uint32_t(b[3]) << 24;
  }
  uint64_t u64() {
    uint64_t lo = u32();
    uint64_t hi = u32();
    return lo | hi << 32;
  }
  int64_t long_le(uint64_t n) {
    if (n > 8) bad("integer wider than 64 bits");
    if (n == 0) return 0;
    const uint8_t* b = take(n);
    uint64_t v = 0;
    for (uint64_t k = 0; k < n; ++k) v |= uint64_t(b[k]) << (8 * k);
    if (n < 8 && (b[n - 1] & 0x80)) v |= ~uint64_t(0) << (8 * n);  // sign-extend
    return static_cast<int64_t>(v);
  }
  std::string read_line() {
    const uint8_t* nl = static_cast<const uint8_t*>(std::memchr(p_, '\n', static_cast<size_t>(end_ - p_)));
    if (!nl) bad("unterminated line");
    std::string s(reinterpret_cast<const char*>(p_), static_cast<size_t>(nl - p_));
    p_ = nl + 1;
    return s;
  }
  Val str(uint64_t n, Kind k = Kind::Str) {
    if (n > static_cast<uint64_t>(end_ - p_)) bad("string past end of data");
    const uint8_t* b = take(static_cast<size_t>(n));
    return make_str(std::string(reinterpret_cast<const char*>(b), static_cast<size_t>(n)), k);
  }
  void push(Val v) { stack_.push_back(std::move(v)); }
  Val pop() {
    need(1);
    Val v = std::move(stack_.back());
    stack_.pop_back();
    return v;
  }
  Val& top() {
    need(1);
    return stack_.back();
  }
  std::vector<Val> pop_mark() {
    if (marks_.empty()) bad("missing MARK");
    const size_t m = marks_.back();
    marks_.pop_back();
    if (m > stack_.size()) bad("MARK past stack");
    std::vector<Val> items(stack_.begin() + static_cast<std::ptrdiff_t>(m), stack_.end());
    stack_.resize(m);
    return items;
  }
  Val memo(uint64_t k) {
    auto it = memo_.find(k);
    if (it == memo_.end()) bad("memo key " + std::to_string(k) + " not found");
    return it->second;
  }
  Val expect(const Val& v, Kind k, const char* op) {
    if (v->kind != k) bad(std::string(op) + " on the wrong type");
    return v;
  }
  Val seq(Kind k, std::vector<Val> items) {
    auto v = make(k);
    v->items = std::move(items);
    return v;
  }
  void add_pairs(PyVal& d, const std::vector<Val>& kv) {
    if (kv.size() % 2) bad("odd number of dict items");
    for (size_t k = 0; k < kv.size(); k += 2) d.dict.emplace_back(kv[k], kv[k + 1]);
  }
  Val object(const Val& cls, const Val& args) {
    auto o = make(Kind::Object);
    o->items = {cls, args};
    return o;
  }
  const Val& arg(const Val& args, size_t k, const std::string& fn) {
    if (args->kind != Kind::Tuple || args->items.size() <= k) bad(fn + ": too few arguments");
    return args->items[k];
  }
  std::vector<int64_t> ints(const Val& v, const std::string& fn) {
    if (v->kind != Kind::Tuple && v->kind != Kind::List) bad(fn + ": expected a tuple of ints");
    std::vector<int64_t> out;
    for (auto& x : v->items) {
      if (x->kind != Kind::Int) bad(fn + ": expected a tuple of ints");
      out.push_back(x->i);
    }
    return out;
  }

  Val call(const Val& fn, const Val& args, int depth = 0) {
    if (fn->kind != Kind::Global) return object(fn, args);
    const std::string full = fn->s + "." + fn->name;
    if (full == "collections.OrderedDict") {
      auto d = make(Kind::Dict);
      if (args->kind == Kind::Tuple && !args->items.empty() && args->items[0]->kind == Kind::List)
        for (auto& pair : args->items[0]->items)
          if (pair->kind == Kind::Tuple && pair->items.size() == 2) d->dict.emplace_back(pair->items[0], pair->items[1]);
      return d;
    }
    if (full == "torch._utils._rebuild_tensor_v2" || full == "torch._utils._rebuild_tensor") {
      const Val& storage = arg(args, 0, full);
      if (storage->kind != Kind::Storage) bad(full + ": first argument is not a storage");
      const int64_t offset = arg(args, 1, full)->i;
      auto size = ints(arg(args, 2, full), full);
      auto stride = ints(arg(args, 3, full), full);
      if (size.size() != stride.size()) bad(full + ": size and stride differ in length");
      if (offset < 0) bad(full + ": negative storage offset");
      int64_t last = offset;  // the last element's index in the storage
      bool empty = false, overflow = false;
      for (size_t k = 0; k < size.size(); ++k) {
        if (size[k] < 0 || stride[k] < 0) bad(full + ": negative size or stride");
        if (size[k] == 0) empty = true;
        int64_t span = 0;
        overflow = overflow || __builtin_mul_overflow(size[k] - 1, stride[k], &span) ||
                   __builtin_add_overflow(last, span, &last);
      }
      if (overflow && !empty) bad(full + ": tensor extends past its storage '" + storage->s + "'");
      auto t = make(Kind::Tensor);
      if (empty) {
        t->tensor = at::empty(size, storage->tensor.options());
      } else {
        if (last >= storage->tensor.numel())
          bad(full + ": tensor extends past its storage '" + storage->s + "'");
        t->tensor = storage->tensor.as_strided(size, stride, offset);
      }
      return t;
    }
    if (full == "torch._utils._rebuild_parameter" || full == "torch._utils._rebuild_parameter_with_state" ||
        full == "torch.jit._pickle.restore_type_tag" || full == "torch.jit._pickle.build_intlist" ||
        full == "torch.jit._pickle.build_doublelist" || full == "torch.jit._pickle.build_boollist" ||
        full == "torch.jit._pickle.build_tensorlist")
      return arg(args, 0, full);
    if (full == "torch._tensor._rebuild_from_type_v2" || full == "torch._tensor._rebuild_from_type") {
      // It wraps another rebuild call; a file can chain it once per few bytes.
      if (depth >= 8) bad(full + " nested more than 8 deep");
      return call(arg(args, 0, full), arg(args, 2, full), depth + 1);
    }
    if (full.rfind("torch._utils._rebuild_", 0) == 0)
      TANDEM_FAIL("cannot read weights file '", file_, "': it holds a tensor kind tandem does not load (", full,
                  "); save plain dense tensors");
    return object(fn, args);
  }

  Val persistent_load(const Val& pid) {
    if (pid->kind != Kind::Tuple || pid->items.size() < 3 || pid->items[0]->kind != Kind::Str ||
        pid->items[0]->s != "storage")
      bad("unknown persistent id");
    const Val& type = pid->items[1];
    const Val& key = pid->items[2];
    if (type->kind != Kind::Global || key->kind != Kind::Str) bad("bad storage reference");
    static const std::unordered_map<std::string, at::ScalarType> types{
        {"FloatStorage", at::kFloat},        {"DoubleStorage", at::kDouble},
        {"HalfStorage", at::kHalf},          {"BFloat16Storage", at::kBFloat16},
        {"LongStorage", at::kLong},          {"IntStorage", at::kInt},
        {"ShortStorage", at::kShort},        {"CharStorage", at::kChar},
        {"ByteStorage", at::kByte},          {"BoolStorage", at::kBool},
        {"UntypedStorage", at::kByte},       {"ComplexFloatStorage", at::kComplexFloat},
        {"ComplexDoubleStorage", at::kComplexDouble}};
    auto it = types.find(type->name);
    if (it == types.end()) bad("unsupported storage type " + type->s + "." + type->name);
    auto v = make(Kind::Storage);
    v->s = key->s;
    auto cached = storages_.find(key->s);
    if (cached != storages_.end()) {
      v->tensor = cached->second;
    } else {
      v->tensor = loader_(key->s, it->second);
      storages_.emplace(key->s, v->tensor);
    }
    return v;
  }

  const uint8_t* p_;
  const uint8_t* end_;
  std::string file_;
  StorageLoader loader_;
  std::vector<Val> stack_;
  std::vector<size_t> marks_;
  std::unordered_map<uint64_t, Val> memo_;
  std::unordered_map<std::string, at::Tensor> storages_;
  std::vector<Val> all_;  // every value made; see Note [Unpickled values are freed flat]
};

std::string shape_str(at::IntArrayRef s) {
  std::ostringstream os;
  os << s;
  return os.str();
}

// Tensors of a dict value, in order; Str keys only.
std::vector<std::pair<std::string, at::Tensor>> tensors_of(const PyVal& d) {
  std::vector<std::pair<std::string, at::Tensor>> out;
  for (auto& [k, v] : d.dict)
    if (k->kind == Kind::Str && v->kind == Kind::Tensor) out.emplace_back(k->s, v->tensor);
  return out;
}

const PyVal* find_key(const PyVal& d, const std::string& key) {
  for (auto& [k, v] : d.dict)
    if (k->kind == Kind::Str && k->s == key) return v.get();
  return nullptr;
}

}  // namespace

std::vector<std::pair<std::string, at::Tensor>> read_weights(const std::string& path) {
  std::error_code ec;
  TANDEM_CHECK(std::filesystem::is_regular_file(path, ec), "weights file '", path,
               "' not found (or not a regular file); check the path");
  std::unique_ptr<caffe2::serialize::PyTorchStreamReader> reader;
  at::DataPtr pkl;
  size_t pkl_size = 0;
  try {
    reader = std::make_unique<caffe2::serialize::PyTorchStreamReader>(path);
    TANDEM_CHECK(reader->hasRecord("data.pkl"), "weights file '", path,
                 "' is a zip archive without data.pkl (a TorchScript module? save a state_dict with torch.save "
                 "instead)");
    std::tie(pkl, pkl_size) = reader->getRecord("data.pkl");
  } catch (const c10::Error& e) {
    TANDEM_FAIL("cannot read weights file '", path, "': not a PyTorch zip archive (", e.what_without_backtrace(),
                "); save it with torch.save(model.state_dict(), path) from PyTorch >= 1.6 or tandem's save_weights");
  }
  if (reader->hasRecord("byteorder")) {
    auto [bo, bo_size] = reader->getRecord("byteorder");
    std::string order(static_cast<const char*>(bo.get()), bo_size);
    TANDEM_CHECK(order == "little", "weights file '", path, "' stores ", order,
                 "-endian tensors; only little-endian files are supported");
  }
  auto loader = [&](const std::string& key, at::ScalarType dtype) {
    const std::string rec = "data/" + key;
    TANDEM_CHECK(reader->hasRecord(rec), "weights file '", path, "' is missing tensor data record '", rec, "'");
    auto [data, size] = reader->getRecord(rec);
    const size_t elem = c10::elementSize(dtype);
    TANDEM_CHECK(size % elem == 0, "weights file '", path, "': record '", rec, "' has ", size,
                 " bytes, not a multiple of the ", dtype, " element size");
    auto t = at::empty({static_cast<int64_t>(size / elem)}, at::TensorOptions().dtype(dtype));
    if (size) std::memcpy(t.data_ptr(), data.get(), size);
    return t;
  };
  Unpickler up(static_cast<const uint8_t*>(pkl.get()), pkl_size, path, loader);
  Val root;
  try {
    root = up.run();
  } catch (const c10::Error& e) {
    TANDEM_FAIL("cannot read weights file '", path, "': ", e.what_without_backtrace());
  }
  TANDEM_CHECK(root && root->kind == Kind::Dict, "weights file '", path,
               "' does not hold a dict of tensors (a state_dict); save model.state_dict()");
  const PyVal* d = root.get();
  for (const char* wrapper : {"state_dict", "model", "model_state_dict"}) {
    const PyVal* inner = find_key(*root, wrapper);
    if (inner && inner->kind == Kind::Dict && !tensors_of(*inner).empty()) {
      d = inner;
      break;
    }
  }
  auto out = tensors_of(*d);
  TANDEM_CHECK(!out.empty(), "weights file '", path, "' holds a dict with no tensors; save model.state_dict()");
  bool all_prefixed = true;
  for (auto& kv : out) all_prefixed = all_prefixed && kv.first.rfind("module.", 0) == 0;
  if (all_prefixed)
    for (auto& kv : out) kv.first.erase(0, 7);
  return out;
}

void load_weights(torch::nn::Module& module, const std::string& path) {
  auto entries = read_weights(path);
  std::unordered_map<std::string, size_t> index;
  for (size_t k = 0; k < entries.size(); ++k) index.emplace(entries[k].first, k);

  std::vector<std::pair<at::Tensor, at::Tensor>> copies;  // dst, src
  std::unordered_map<std::string, bool> wanted;
  auto match = [&](const std::string& name, const at::Tensor& dst) {
    wanted[name] = true;
    auto it = index.find(name);
    TANDEM_CHECK(it != index.end(), "weights file '", path, "' has no entry '", name, "' (shape ",
                 shape_str(dst.sizes()), ") that the model needs; the file has ", entries.size(),
                 " tensors, first '", entries[0].first, "': was it saved from a different model?");
    const at::Tensor& src = entries[it->second].second;
    TANDEM_CHECK(src.sizes() == dst.sizes(), "weights file '", path, "': '", name, "' has shape ",
                 shape_str(src.sizes()), " in the file but ", shape_str(dst.sizes()),
                 " in the model (different num_classes / in_channels / depth?)");
    copies.emplace_back(dst, src);
  };
  for (const auto& p : module.named_parameters(/*recurse=*/true)) match(p.key(), p.value());
  for (const auto& b : module.named_buffers(/*recurse=*/true)) match(b.key(), b.value());
  for (const auto& e : entries)
    TANDEM_CHECK(wanted.count(e.first), "weights file '", path, "' has an unexpected entry '", e.first,
                 "' (shape ", shape_str(e.second.sizes()), ") that the model does not have: wrong model?");

  torch::NoGradGuard no_grad;
  for (auto& [dst, src] : copies) dst.copy_(src);
}

void save_weights(const torch::nn::Module& module, const std::string& path) {
  c10::Dict<std::string, at::Tensor> dict;
  for (const auto& p : module.named_parameters(/*recurse=*/true))
    dict.insert(p.key(), p.value().detach().cpu().contiguous());
  for (const auto& b : module.named_buffers(/*recurse=*/true))
    dict.insert(b.key(), b.value().detach().cpu().contiguous());
  const std::vector<char> bytes = torch::pickle_save(c10::IValue(dict));
  const std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    TANDEM_CHECK(out, "cannot write weights file '", tmp, "': ", std::strerror(errno),
                 " (does the directory exist and is it writable?)");
    out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
    out.close();
    TANDEM_CHECK(out.good(), "cannot write weights file '", tmp, "' (disk full?)");
  }
  std::error_code ec;
  std::filesystem::rename(tmp, path, ec);
  TANDEM_CHECK(!ec, "cannot move '", tmp, "' to '", path, "': ", ec.message());
}

}  // namespace tandem::models
