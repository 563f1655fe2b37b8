// Why: the checks every binding runs before a buffer becomes a raw pointer, with errors that name
// the argument at fault (they surface in Python as ValueError / TypeError).
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

namespace lazarus {
namespace bindings {

namespace py = pybind11;

// Raises TypeError unless `a` has dtype T, ValueError unless it is C-contiguous with `expected` elements.
template <typename T>
void check_array(const py::array& a, const char* name, int64_t expected, const char* dtype_name) {
  if (!py::isinstance<py::array_t<T>>(a) || a.itemsize() != static_cast<py::ssize_t>(sizeof(T))) {
    throw py::type_error(std::string(name) + " must have dtype " + dtype_name + ", got " +
                         std::string(py::str(a.dtype())));
  }
  if (!(a.flags() & py::array::c_style)) {
    throw py::value_error(std::string(name) + " must be C-contiguous");
  }
  if (expected >= 0 && a.size() != expected) {
    throw py::value_error(std::string(name) + " has " + std::to_string(a.size()) + " elements, expected " +
                          std::to_string(expected));
  }
}

inline void check_writeable(const py::array& a, const char* name) {
  if (!a.writeable()) throw py::value_error(std::string(name) + " must be writeable");
}

// Raises ValueError for a null device pointer when there is work to do.
inline void check_device_pointer(uintptr_t ptr, const char* name, int64_t n) {
  if (n > 0 && ptr == 0) throw py::value_error(std::string(name) + " is a null pointer");
}

}  // namespace bindings
}  // namespace lazarus
