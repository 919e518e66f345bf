/* SPDX-License-Identifier: MIT */
/*
 * NBD wire protocol: constants and on-wire structs, as fixed by doc/proto.md
 * of the NBD project. All multi-byte fields travel in network byte order;
 * the structs below hold them exactly as they sit on the wire (big-endian),
 * so convert with be16toh()/be32toh()/be64toh() when reading them.
 *
 * The NBD protocol carries no checksum: integrity is the transport's job.
 * Every struct has a _Static_assert on its wire size.
 */
#ifndef FLASHTIER_NBD_PROTO_H
#define FLASHTIER_NBD_PROTO_H

#include <stdint.h>

/* Handshake magics. */
#define NBD_MAGIC                0x4e42444d41474943ULL /* "NBDMAGIC" */
#define NBD_IHAVEOPT             0x49484156454f5054ULL /* "IHAVEOPT" */
#define NBD_REP_MAGIC            0x0003e889045565a9ULL

/* Handshake flags (server) and client flags. */
#define NBD_FLAG_FIXED_NEWSTYLE   (1u << 0)
#define NBD_FLAG_NO_ZEROES        (1u << 1)
#define NBD_FLAG_C_FIXED_NEWSTYLE (1u << 0)
#define NBD_FLAG_C_NO_ZEROES      (1u << 1)

/* Options. */
#define NBD_OPT_EXPORT_NAME       1u
#define NBD_OPT_ABORT             2u
#define NBD_OPT_LIST              3u
#define NBD_OPT_PEEK_EXPORT       4u
#define NBD_OPT_STARTTLS          5u
#define NBD_OPT_INFO              6u
#define NBD_OPT_GO                7u
#define NBD_OPT_STRUCTURED_REPLY  8u
#define NBD_OPT_LIST_META_CONTEXT 9u
#define NBD_OPT_SET_META_CONTEXT  10u
#define NBD_OPT_EXTENDED_HEADERS  11u

/* Option replies. */
#define NBD_REP_ACK                 1u
#define NBD_REP_SERVER              2u
#define NBD_REP_INFO                3u
#define NBD_REP_META_CONTEXT        4u
#define NBD_REP_ERR(n)              ((1u << 31) + (n))
#define NBD_REP_ERR_UNSUP           NBD_REP_ERR(1)
#define NBD_REP_ERR_POLICY          NBD_REP_ERR(2)
#define NBD_REP_ERR_INVALID         NBD_REP_ERR(3)
#define NBD_REP_ERR_PLATFORM        NBD_REP_ERR(4)
#define NBD_REP_ERR_TLS_REQD        NBD_REP_ERR(5)
#define NBD_REP_ERR_UNKNOWN         NBD_REP_ERR(6)
#define NBD_REP_ERR_SHUTDOWN        NBD_REP_ERR(7)
#define NBD_REP_ERR_BLOCK_SIZE_REQD NBD_REP_ERR(8)
#define NBD_REP_ERR_TOO_BIG         NBD_REP_ERR(9)

/* Info types (NBD_OPT_INFO / NBD_OPT_GO). */
#define NBD_INFO_EXPORT      0u
#define NBD_INFO_NAME        1u
#define NBD_INFO_DESCRIPTION 2u
#define NBD_INFO_BLOCK_SIZE  3u

/* Transmission flags. */
#define NBD_FLAG_HAS_FLAGS         (1u << 0)
#define NBD_FLAG_READ_ONLY         (1u << 1)
#define NBD_FLAG_SEND_FLUSH        (1u << 2)
#define NBD_FLAG_SEND_FUA          (1u << 3)
#define NBD_FLAG_ROTATIONAL        (1u << 4)
#define NBD_FLAG_SEND_TRIM         (1u << 5)
#define NBD_FLAG_SEND_WRITE_ZEROES (1u << 6)
#define NBD_FLAG_SEND_DF           (1u << 7)
#define NBD_FLAG_CAN_MULTI_CONN    (1u << 8)
#define NBD_FLAG_SEND_RESIZE       (1u << 9)
#define NBD_FLAG_SEND_CACHE        (1u << 10)
#define NBD_FLAG_SEND_FAST_ZERO    (1u << 11)

/* Transmission: requests and replies. */
#define NBD_REQUEST_MAGIC          0x25609513u
#define NBD_SIMPLE_REPLY_MAGIC     0x67446698u
#define NBD_STRUCTURED_REPLY_MAGIC 0x668e33efu

#define NBD_CMD_READ         0u
#define NBD_CMD_WRITE        1u
#define NBD_CMD_DISC         2u
#define NBD_CMD_FLUSH        3u
#define NBD_CMD_TRIM         4u
#define NBD_CMD_CACHE        5u
#define NBD_CMD_WRITE_ZEROES 6u
#define NBD_CMD_BLOCK_STATUS 7u

#define NBD_CMD_FLAG_FUA       (1u << 0)
#define NBD_CMD_FLAG_NO_HOLE   (1u << 1)
#define NBD_CMD_FLAG_DF        (1u << 2)
#define NBD_CMD_FLAG_REQ_ONE   (1u << 3)
#define NBD_CMD_FLAG_FAST_ZERO (1u << 4)

#define NBD_REPLY_FLAG_DONE        (1u << 0)
#define NBD_REPLY_TYPE_NONE        0u
#define NBD_REPLY_TYPE_OFFSET_DATA 1u
#define NBD_REPLY_TYPE_OFFSET_HOLE 2u
#define NBD_REPLY_TYPE_ERROR       ((1u << 15) + 1)

/* Error values: the only ones that may cross the wire. */
#define NBD_EPERM     1u
#define NBD_EIO       5u
#define NBD_ENOMEM    12u
#define NBD_EINVAL    22u
#define NBD_ENOSPC    28u
#define NBD_EOVERFLOW 75u
#define NBD_ENOTSUP   95u
#define NBD_ESHUTDOWN 108u

/* Protocol limits (doc/proto.md "Conventions" and "Size constraints"). */
#define NBD_MAX_STRING      4096u
#define NBD_MAX_PAYLOAD     (32u << 20) /* what flashtierd serves per request */
#define NBD_MAX_BLOCK_SHIFT 16          /* minimum block size is at most 64 KiB */

/* C: option request header. */
struct nbd_option_header {
	uint64_t magic; /* NBD_IHAVEOPT */
	uint32_t option;
	uint32_t length;
} __attribute__((packed));
_Static_assert(sizeof(struct nbd_option_header) == 16, "nbd_option_header wire size");

/* S: option reply header. */
struct nbd_option_reply {
	uint64_t magic; /* NBD_REP_MAGIC */
	uint32_t option;
	uint32_t type;
	uint32_t length;
} __attribute__((packed));
_Static_assert(sizeof(struct nbd_option_reply) == 20, "nbd_option_reply wire size");

/* S: first message of fixed newstyle. */
struct nbd_new_handshake {
	uint64_t nbdmagic; /* NBD_MAGIC */
	uint64_t version;  /* NBD_IHAVEOPT */
	uint16_t gflags;
} __attribute__((packed));
_Static_assert(sizeof(struct nbd_new_handshake) == 18, "nbd_new_handshake wire size");

/* S: reply to NBD_OPT_EXPORT_NAME (followed by 124 zeroes unless NO_ZEROES). */
struct nbd_export_name_reply {
	uint64_t size;
	uint16_t eflags;
} __attribute__((packed));
_Static_assert(sizeof(struct nbd_export_name_reply) == 10, "nbd_export_name_reply wire size");

struct nbd_info_export {
	uint16_t info; /* NBD_INFO_EXPORT */
	uint64_t size;
	uint16_t eflags;
} __attribute__((packed));
_Static_assert(sizeof(struct nbd_info_export) == 12, "nbd_info_export wire size");

struct nbd_info_block_size {
	uint16_t info; /* NBD_INFO_BLOCK_SIZE */
	uint32_t minimum;
	uint32_t preferred;
	uint32_t maximum;
} __attribute__((packed));
_Static_assert(sizeof(struct nbd_info_block_size) == 14, "nbd_info_block_size wire size");

/* C: transmission request. */
struct nbd_request {
	uint32_t magic; /* NBD_REQUEST_MAGIC */
	uint16_t flags;
	uint16_t type;
	uint64_t cookie;
	uint64_t offset;
	uint32_t length;
} __attribute__((packed));
_Static_assert(sizeof(struct nbd_request) == 28, "nbd_request wire size");

/* S: simple reply. */
struct nbd_simple_reply {
	uint32_t magic; /* NBD_SIMPLE_REPLY_MAGIC */
	uint32_t error;
	uint64_t cookie;
} __attribute__((packed));
_Static_assert(sizeof(struct nbd_simple_reply) == 16, "nbd_simple_reply wire size");

/* S: structured reply chunk header. */
struct nbd_structured_reply {
	uint32_t magic; /* NBD_STRUCTURED_REPLY_MAGIC */
	uint16_t flags;
	uint16_t type;
	uint64_t cookie;
	uint32_t length;
} __attribute__((packed));
_Static_assert(sizeof(struct nbd_structured_reply) == 20, "nbd_structured_reply wire size");

/* Payload prefix of NBD_REPLY_TYPE_OFFSET_DATA. */
struct nbd_offset_data {
	uint64_t offset;
} __attribute__((packed));
_Static_assert(sizeof(struct nbd_offset_data) == 8, "nbd_offset_data wire size");

/* Payload of NBD_REPLY_TYPE_ERROR (followed by the message). */
struct nbd_error_chunk {
	uint32_t error;
	uint16_t msg_len;
} __attribute__((packed));
_Static_assert(sizeof(struct nbd_error_chunk) == 6, "nbd_error_chunk wire size");

#endif
