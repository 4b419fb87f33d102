// Renders an Ollama TEMPLATE with Go's text/template, the engine Ollama uses, the way Ollama's chat endpoint
// calls it: the Modelfile's SYSTEM becomes a leading system message when the conversation has none.
// Input (stdin, JSON): {"template": "...", "system": "...", "conversations": [[{"role": ..., "content": ...}]]}
// Output (stdout, JSON): one rendered string per conversation.
package main

import (
	"encoding/json"
	"os"
	"strings"
	"text/template"
)

type Message struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

type Values struct {
	Messages []Message
	System   string
}

type Input struct {
	Template      string      `json:"template"`
	System        *string     `json:"system"`
	Conversations [][]Message `json:"conversations"`
}

func main() {
	var input Input
	if err := json.NewDecoder(os.Stdin).Decode(&input); err != nil {
		panic(err)
	}
	tmpl := template.Must(template.New("").Parse(input.Template))
	var rendered []string
	for _, messages := range input.Conversations {
		values := Values{Messages: messages}
		if input.System != nil && (len(messages) == 0 || messages[0].Role != "system") {
			values.Messages = append([]Message{{Role: "system", Content: *input.System}}, messages...)
			values.System = *input.System
		}
		var out strings.Builder
		if err := tmpl.Execute(&out, values); err != nil {
			panic(err)
		}
		rendered = append(rendered, out.String())
	}
	if err := json.NewEncoder(os.Stdout).Encode(rendered); err != nil {
		panic(err)
	}
}
