// wasi-kv: a small key-value server in Go that speaks the part of the Redis protocol (RESP2)
// that redis-cli and redis-benchmark use: PING, ECHO, SET, GET, DEL, EXISTS, INCR, INCRBY,
// DBSIZE, and CONFIG GET / COMMAND as stubs so the benchmark tool starts.
//
// Built for WASI (GOOS=wasip1 GOARCH=wasm) it takes its listening socket as file descriptor 3,
// as `wasmtime run --tcplisten` and Lockstep's wasi guest hand it over. Built for the host it
// listens on -listen instead, so the same program can be measured natively.
//
// It knows nothing of Lockstep: under `lockstep-agent run --wasm kv.wasm` it is recorded and
// replayed, and under `up --wasm` it survives the loss of its host.
package main

import (
	"bufio"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"strconv"
	"strings"
	"sync"
)

type store struct {
	mu   sync.Mutex
	data map[string][]byte
}

func listener(addr string) (net.Listener, error) {
	if addr != "" {
		return net.Listen("tcp", addr)
	}
	// The socket the runtime preopened for us (WASI has no socket() or bind()).
	return net.FileListener(os.NewFile(3, "listener"))
}

func main() {
	addr := flag.String("listen", "", "listen on this TCP address instead of taking fd 3 (native builds)")
	quiet := flag.Bool("quiet", false, "do not log connections")
	flag.Parse()
	ln, err := listener(*addr)
	if err != nil {
		fmt.Fprintln(os.Stderr, "wasi-kv:", err)
		os.Exit(1)
	}
	fmt.Printf("wasi-kv: serving on %s (%s)\n", ln.Addr(), os.Getenv("KV_NAME"))
	s := &store{data: make(map[string][]byte)}
	for {
		c, err := ln.Accept()
		if err != nil {
			fmt.Fprintln(os.Stderr, "wasi-kv: accept:", err)
			os.Exit(1)
		}
		if !*quiet {
			fmt.Println("wasi-kv: client connected")
		}
		go s.serve(c)
	}
}

// readCommand reads one command: a RESP array of bulk strings, or an inline line.
func readCommand(r *bufio.Reader) ([]string, error) {
	line, err := r.ReadString('\n')
	if err != nil {
		return nil, err
	}
	line = strings.TrimRight(line, "\r\n")
	if !strings.HasPrefix(line, "*") {
		return strings.Fields(line), nil
	}
	n, err := strconv.Atoi(line[1:])
	if err != nil || n < 0 || n > 1024*1024 {
		return nil, errors.New("bad array length")
	}
	args := make([]string, 0, n)
	for i := 0; i < n; i++ {
		h, err := r.ReadString('\n')
		if err != nil {
			return nil, err
		}
		if !strings.HasPrefix(h, "$") {
			return nil, errors.New("expected a bulk string")
		}
		l, err := strconv.Atoi(strings.TrimRight(h[1:], "\r\n"))
		if err != nil || l < 0 || l > 512*1024*1024 {
			return nil, errors.New("bad bulk length")
		}
		buf := make([]byte, l+2)
		if _, err := io.ReadFull(r, buf); err != nil {
			return nil, err
		}
		args = append(args, string(buf[:l]))
	}
	return args, nil
}

func bulk(w *bufio.Writer, v []byte) {
	if v == nil {
		w.WriteString("$-1\r\n")
		return
	}
	fmt.Fprintf(w, "$%d\r\n", len(v))
	w.Write(v)
	w.WriteString("\r\n")
}

func (s *store) serve(c net.Conn) {
	defer c.Close()
	r := bufio.NewReaderSize(c, 16*1024)
	w := bufio.NewWriterSize(c, 16*1024)
	for {
		args, err := readCommand(r)
		if err != nil {
			if err != io.EOF {
				w.WriteString("-ERR protocol error\r\n")
				w.Flush()
			}
			return
		}
		if len(args) > 0 && s.exec(w, args) {
			w.Flush()
			return
		}
		// Answer a pipeline once the bytes already received are consumed.
		if r.Buffered() == 0 {
			if w.Flush() != nil {
				return
			}
		}
	}
}

// exec runs one command; true means close the connection after replying.
func (s *store) exec(w *bufio.Writer, args []string) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	switch cmd := strings.ToUpper(args[0]); {
	case cmd == "PING":
		w.WriteString("+PONG\r\n")
	case cmd == "ECHO" && len(args) == 2:
		bulk(w, []byte(args[1]))
	case cmd == "SET" && len(args) >= 3:
		s.data[args[1]] = []byte(args[2])
		w.WriteString("+OK\r\n")
	case cmd == "GET" && len(args) == 2:
		bulk(w, s.data[args[1]])
	case (cmd == "DEL" || cmd == "EXISTS") && len(args) >= 2:
		n := 0
		for _, k := range args[1:] {
			if _, ok := s.data[k]; ok {
				n++
				if cmd == "DEL" {
					delete(s.data, k)
				}
			}
		}
		fmt.Fprintf(w, ":%d\r\n", n)
	case (cmd == "INCR" && len(args) == 2) || (cmd == "INCRBY" && len(args) == 3):
		by := int64(1)
		if cmd == "INCRBY" {
			var err error
			if by, err = strconv.ParseInt(args[2], 10, 64); err != nil {
				w.WriteString("-ERR value is not an integer or out of range\r\n")
				return false
			}
		}
		v := int64(0)
		if old, ok := s.data[args[1]]; ok {
			var err error
			if v, err = strconv.ParseInt(string(old), 10, 64); err != nil {
				w.WriteString("-ERR value is not an integer or out of range\r\n")
				return false
			}
		}
		v += by
		s.data[args[1]] = []byte(strconv.FormatInt(v, 10))
		fmt.Fprintf(w, ":%d\r\n", v)
	case cmd == "DBSIZE":
		fmt.Fprintf(w, ":%d\r\n", len(s.data))
	case cmd == "CONFIG" || cmd == "COMMAND":
		w.WriteString("*0\r\n")
	case cmd == "QUIT":
		w.WriteString("+OK\r\n")
		return true
	default:
		fmt.Fprintf(w, "-ERR unknown command or wrong number of arguments for '%s'\r\n", args[0])
	}
	return false
}
