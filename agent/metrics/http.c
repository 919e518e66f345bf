/* SPDX-License-Identifier: MIT */
/* The /metrics endpoint, served by libmicrohttpd on its own thread. */
#include <stddef.h>
#include <errno.h>
#include <microhttpd.h>
#include <netdb.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#include "flashtier/log.h"
#include "flashtier/metrics.h"

struct ft_metrics_http {
	struct MHD_Daemon *d;
	const struct ft_metrics_volume *vols;
	size_t n;
	const struct ft_server_stats *srv;
};

static enum MHD_Result reply(struct MHD_Connection *conn, unsigned status, const char *ctype,
			     void *body, size_t len, enum MHD_ResponseMemoryMode mode)
{
	struct MHD_Response *resp = MHD_create_response_from_buffer(len, body, mode);
	enum MHD_Result ret;

	if (!resp) {
		if (mode == MHD_RESPMEM_MUST_FREE)
			free(body);
		return MHD_NO;
	}
	MHD_add_response_header(resp, "Content-Type", ctype);
	ret = MHD_queue_response(conn, status, resp);
	MHD_destroy_response(resp);
	return ret;
}

static enum MHD_Result handle(void *cls, struct MHD_Connection *conn, const char *url,
			      const char *method, const char *version, const char *upload_data,
			      size_t *upload_size, void **req_cls)
{
	struct ft_metrics_http *h = cls;
	static const char not_found[] = "not found: try /metrics\n";
	static const char bad_method[] = "method not allowed\n";
	static const char oom[] = "out of memory\n";
	char *body;
	size_t len;

	(void)version;
	(void)upload_data;
	(void)upload_size;
	(void)req_cls;
	if (strcmp(method, "GET") != 0 && strcmp(method, "HEAD") != 0)
		return reply(conn, MHD_HTTP_METHOD_NOT_ALLOWED, "text/plain", (void *)bad_method,
			     sizeof(bad_method) - 1, MHD_RESPMEM_PERSISTENT);
	if (strcmp(url, "/metrics") != 0)
		return reply(conn, MHD_HTTP_NOT_FOUND, "text/plain", (void *)not_found,
			     sizeof(not_found) - 1, MHD_RESPMEM_PERSISTENT);
	body = ft_metrics_render(h->vols, h->n, h->srv, &len);
	if (!body)
		return reply(conn, MHD_HTTP_INTERNAL_SERVER_ERROR, "text/plain", (void *)oom,
			     sizeof(oom) - 1, MHD_RESPMEM_PERSISTENT);
	return reply(conn, MHD_HTTP_OK, "text/plain; version=0.0.4; charset=utf-8", body, len,
		     MHD_RESPMEM_MUST_FREE);
}

int ft_metrics_http_start(const struct ft_listen_addr *addr, const struct ft_metrics_volume *vols,
			  size_t n, const struct ft_server_stats *srv, struct ft_metrics_http **out)
{
	struct addrinfo hints = { .ai_socktype = SOCK_STREAM, .ai_flags = AI_PASSIVE };
	struct ft_metrics_http *h;
	struct addrinfo *ai;
	unsigned flags = MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_ERROR_LOG;
	int rc;

	rc = getaddrinfo(addr->host, addr->port, &hints, &ai);
	if (rc != 0) {
		ft_err("metrics: cannot resolve %s:%s: %s", addr->host, addr->port,
		       gai_strerror(rc));
		return -EINVAL;
	}
	h = calloc(1, sizeof(*h));
	if (!h) {
		freeaddrinfo(ai);
		return -ENOMEM;
	}
	h->vols = vols;
	h->n = n;
	h->srv = srv;
	if (ai->ai_family == AF_INET6)
		flags |= MHD_USE_IPv6;
	h->d = MHD_start_daemon(flags, 0, NULL, NULL, handle, h, MHD_OPTION_SOCK_ADDR, ai->ai_addr,
				MHD_OPTION_CONNECTION_LIMIT, 64u, MHD_OPTION_CONNECTION_TIMEOUT,
				10u, MHD_OPTION_END);
	freeaddrinfo(ai);
	if (!h->d) {
		ft_err("metrics: cannot listen on %s:%s (address in use?)", addr->host, addr->port);
		free(h);
		return -EADDRINUSE;
	}
	ft_info("metrics: serving http://%s%s%s:%s/metrics", strchr(addr->host, ':') ? "[" : "",
		addr->host, strchr(addr->host, ':') ? "]" : "", addr->port);
	*out = h;
	return 0;
}

void ft_metrics_http_stop(struct ft_metrics_http *h)
{
	if (!h)
		return;
	MHD_stop_daemon(h->d);
	free(h);
}
