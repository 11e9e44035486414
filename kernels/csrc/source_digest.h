// The digest of the sources and flags a module was built from (kernels/extension.py passes
// -DBOXMASK_SOURCE_DIGEST=d<hex>), exported as the module's `source_digest` so that the loader uses an
// install build only while it matches the sources it would compile now.
#pragma once

#define BOXMASK_STRINGIFY_(x) #x
#define BOXMASK_STRINGIFY(x) BOXMASK_STRINGIFY_(x)
#ifdef BOXMASK_SOURCE_DIGEST
#define BOXMASK_SOURCE_DIGEST_STRING BOXMASK_STRINGIFY(BOXMASK_SOURCE_DIGEST)
#else
#define BOXMASK_SOURCE_DIGEST_STRING ""
#endif
